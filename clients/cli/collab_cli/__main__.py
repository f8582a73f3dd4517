from collab_cli.main import main

main()
