"""`jaxllm serve`: an OpenAI-compatible HTTP server over the async engine (docs/serving.md).

    from jaxllm import LLM
    from jaxllm.serve import ServeConfig, serve
    serve(LLM(), ServeConfig(served_model_names=["smollm2"]), port=8000)
"""

from jaxllm.serve.app import ServeConfig, build_app
from jaxllm.serve.server import GracefulServer, make_server, serve

__all__ = ["GracefulServer", "ServeConfig", "build_app", "make_server", "serve"]
