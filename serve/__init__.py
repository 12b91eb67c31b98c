"""``querycache serve``: an HTTP sidecar that answers from the current snapshot and falls back to the model.

Hits come from the memory-mapped snapshot, misses from the same :class:`querycache.inference.Engine`
the pipeline runs, through :class:`querycache.store.ReadThroughCache` (hot reload, model-version
check). The routes speak the request and response shapes of text-embeddings-inference. No Beam here.

    from querycache.serve import create_app, load_service
    app = create_app(load_service("/data/qc"))    # any ASGI server runs it
"""

from querycache.serve.app import Limits, create_app
from querycache.serve.service import ModelMismatchError, Service, load_service

__all__ = ["Limits", "ModelMismatchError", "Service", "create_app", "load_service"]
