"""The one frozen backbone, in its rooms.

- `model.py` — `Backbone`: loading (a folder, a hub name, or the packaged MiniLM), identity (the
  fingerprint), what `GET /backbone` describes;
- `tokens.py` — tokenisation: `encode`, padding (`pad_batch`, `Backbone.pad`), PASTA's special-token
  slots, the texts' types;
- `surgery.py` — where each family keeps its modules (`Layout`) and the glue that edits a model:
  module names by role, swapping a module in place, hooks on every layer's input.

The head's input (pooling a sequence into the classifier's z) is `server.pooling.head_input`,
shared by both serving backends and the trainer; which engine backend serves, and in which
precision, is `server.backends`' choice.
"""

from server.backbone.model import PACKAGED_MODEL_NAME, Backbone, packaged_model_path
from server.backbone.surgery import LAYER_ROLES, LAYOUTS, Layout
from server.backbone.tokens import (
    CUT_MARGIN,
    EncodedText,
    InvalidText,
    Marked,
    TextInput,
    Tokenised,
    check_text,
    pad_batch,
)

__all__ = ["CUT_MARGIN", "LAYER_ROLES", "LAYOUTS", "PACKAGED_MODEL_NAME", "Backbone", "EncodedText", "InvalidText",
           "Layout", "Marked", "TextInput", "Tokenised", "check_text", "packaged_model_path", "pad_batch"]
