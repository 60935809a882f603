"""The REST API: FastAPI over the control plane. The CLI and the web UI are its clients."""
