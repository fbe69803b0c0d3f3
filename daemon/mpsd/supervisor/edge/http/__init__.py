"""HTTP at the edge: one server (server.py: h11 on asyncio, under one HttpLimits), one route table (routes.py,
under the access rule gRPC obeys) and what it serves: the OpenAI-compatible API (openai.py, openai_schema.py),
Prometheus /metrics and the status page (status_page.py, status_history.py, static/).

May import the edge's root modules (inference, metrics, access) and what they may import.
"""
