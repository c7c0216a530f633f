"""``kad serve``: one fitted model as an HTTP service.

==================  =====================================================================
``settings``        where it listens, the bearer token, and every bound of a request
``uploads``         request bodies read with bounds, split in memory, decoded as files are
``batching``        the one worker that runs the network, on batches of requests
``app``             the FastAPI application and :func:`~kad.serve.app.serve`
==================  =====================================================================

It needs the ``serve`` extra (``pip install 'kad[serve]'``: FastAPI, uvicorn and
python-multipart). This floor sits above :mod:`kad.screening`, whose functions it calls, and
below :mod:`kad.cli`.
"""
