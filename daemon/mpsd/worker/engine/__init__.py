"""The engine backend: a worker whose model is an external server (llama-server, mlx_lm.server, ds4-server).

process.py starts the server and makes sure it never outlives the worker;
openai_client.py speaks its OpenAI-compatible HTTP API; backend.py is what the
worker's gRPC service calls, in place of the decode loop, since the engine
batches by itself.
"""
