"""bridge: the collab bridge, a separate process between collab-server and browsers.

One upstream event stream and one status stream per process (``upstream``), each event
serialised once (``mapping``, ``hub``) and written to every client that wants it
(``fanout``), over the WebSocket (``websocket``, ``protocol``), Server-Sent Events
(``sse``) and the REST routes (``rest``) of the Real-Time Collaboration Guide.
"""
