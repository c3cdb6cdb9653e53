"""Adapters to other frameworks, each an optional extra imported only when used: `attnkit.integrations.ultralytics`
(YOLO yaml layers and attach() into YOLO models; `pip install attnkit[yolo]`). timm needs no adapter: every attnkit
module is a timm `attn_layer` / `se_layer` as it is."""
