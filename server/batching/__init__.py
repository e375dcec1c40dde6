"""Cross-request batching: predict requests for any mix of tasks answered by one engine forward.

- `jobs`: what flows through (`Job`, `Item`, `Answer`), the refusals (`Overloaded`, `ShuttingDown`) and
  the `Batcher` protocol, which `PipelineBatcher` and Ray Serve's `ServeBatcher` (server.ray_app) implement;
- `formation`: which waiting rows run together (length-aware, per row);
- `runner`: the tokenizer thread and the prepare / forward / finish stages (`BatchRunner`);
- `pipeline`: `PipelineBatcher`, admission, the queue and the pipeline of stages around the engine.
"""

from server.backbone import TextInput
from server.batching.formation import form_batch, padded_tokens
from server.batching.jobs import Answer, Batcher, Item, Job, Outcome, Overloaded, ShuttingDown
from server.batching.pipeline import PipelineBatcher
from server.batching.runner import BatchRunner, Prepared, Runner, Tokenizer

__all__ = ["Answer", "BatchRunner", "Batcher", "Item", "Job", "Outcome", "Overloaded", "PipelineBatcher",
           "Prepared", "Runner", "ShuttingDown", "TextInput", "Tokenizer", "form_batch", "padded_tokens"]
