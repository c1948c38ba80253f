"""The node's HTTP service (Starlette on uvicorn): see :mod:`node.http.app`."""
