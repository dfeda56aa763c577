"""Serving front ends, and what lives where.

* ``cli`` -- the command-line chat (:class:`~llava.serve.cli.ChatSession`, reused by the others);
  ``gradio_web`` -- the web demo; ``options`` -- command-line pieces they share.
* The OpenAI-compatible server, one seam per module:
  ``api`` -- its command line (``python -m llava.serve.api``, ``slowfast-api``), re-exporting the public names;
  ``protocol`` -- the request schema, its validation and OpenAI-style errors (:class:`ApiError`);
  ``prompt`` -- messages to the template's prompt, and its length bounded before tokenizing;
  ``server`` -- :class:`ChatServer`: a request to an engine job in stages that refuse before they work;
  ``app`` -- the FastAPI routes, server-sent events and serving in a thread;
  ``batching`` -- the engine that generates for many requests in one batch, failures isolated per request;
  ``token_cache`` -- encoded visual tokens cached by content;
  ``media`` -- media URLs to bytes, read and decoded through :mod:`llava.media_gate`;
  ``limits`` -- admission: requests held and their memory; ``guards`` -- Host/Origin and content type;
  ``metrics`` -- Prometheus metrics; ``logprobs`` -- token log-probabilities.
"""
