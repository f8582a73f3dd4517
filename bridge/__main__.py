from collab_grpc.extras import bridge_command

bridge_command()
