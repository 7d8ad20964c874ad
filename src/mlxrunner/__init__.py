"""mlxrunner: a model-runner subprocess for MLX (image generation, LLMs, embeddings).

The hot paths live in the C++ extension ``mlxrunner._core``; this package does argument
parsing, model resolution, weight loading, tokenization and the HTTP server.
"""

__version__ = "0.1.0"
