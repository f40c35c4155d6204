"""Label Studio's wire format, written once: the bottom layer every Label Studio user shares.

- :mod:`.rle`: brush RLE codec (``encode`` / ``decode`` / ``check``).
- :mod:`.configs`: the rating and segmentation label configs and their one parser
  (:func:`.configs.find_brush_controls`, :func:`.configs.validate_segmentation_config`, ...).
- :mod:`.brush`: the one brush-result builder, brush-prediction validation and annotation -> mask.
- :mod:`.client`: the SDK client with bounded retries (``LABEL_STUDIO_URL`` / ``LABEL_STUDIO_API_KEY``).
- :mod:`.task_images`: a task's image (local files or downloaded) for the backend's ``/predict``.
- :mod:`.connect`: connecting the ML backend to a project (basic auth on the webhook included).

Used by the ML backend (``ml_backend.model``, ``jobs``, ``app``), the round projects
(``projects.round_projects``, ``projects.rating``, ``projects.segmentation``) and the simulated
annotators (``projects.simulation.oracle``). Imports nothing from ``sampler`` or ``projects``.
"""
