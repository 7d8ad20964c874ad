"""The runner's HTTP side: the server (server.py), the wire types and their bounds (protocol.py), and one
module per wire protocol (ollama.py: the runner protocol Ollama's parent speaks; openai.py: /v1/*).

Importing this package imports nothing else: the models import `http.protocol` without aiohttp.
"""
