"""The runner's HTTP side: the application (app.py) of a server whose services every route shares (server.py),
the wire types and their bounds (protocol.py), and one module per wire protocol (ollama.py: the runner protocol
Ollama's parent speaks; openai.py: /v1/*; mlx_engine.py: Ollama's current LLM runner protocol).

Importing this package imports nothing else: the models import `http.protocol` without aiohttp.
"""
