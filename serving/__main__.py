"""`python -m serving` / `tuneserve-serving`: the vLLM engine behind an internal HTTP port."""

from __future__ import annotations


def main() -> None:
    import uvicorn

    from core.logs import setup_logging
    from core.settings import get_settings
    from serving.app import check_bind_address, create_app

    setup_logging()
    settings = get_settings()
    check_bind_address(settings)
    uvicorn.run(create_app(settings), host=settings.serving_host, port=settings.serving_port, log_level="info")


# vLLM spawns its engine core as a child that re-imports this module: only the parent may start serving.
if __name__ == "__main__":
    main()
