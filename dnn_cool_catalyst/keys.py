"""The names of keys that cross module boundaries: one home for each literal.

Input mapping `X` (what a loader yields, what `flow.get_dataset` builds):

- `GT` (`X["gt"]`): the precondition labels `{path: labels}` that the masks read during training;
- `INDEX` (`X["index"]`): each sample's index in its dataset (int64), added by `flow.get_dataset`
  unless `with_index=False`; from a `MixedDataset`, the index within the sample's source;
- `SOURCE` (`X["source"]`): from a `MixedDataset`, the position of each sample's source in its
  `source_names` (int64);
- `ELEMENTS` (`X["elements"]`, optional): the padding marker of tasks with element dimensions,
  bool `(N, T)`, True where a position (token) exists; read by the masks.

`runner.batch` after `FlowRunner.handle_batch` (the layout the callbacks read; see
`dnn_cool_catalyst.callbacks.batch` for what each holds): `INPUTS`, `TARGETS`, `OUTPUTS`,
`LOSS_TERMS`, `METRIC_STATES`, `PER_SAMPLE_LOSS`, `EXPLAIN`.

A flow module's outputs (`flow.torch()(X)`): `LOGITS`, `MASK`, `ACTIVATED`, `DECODED`.
"""

GT = "gt"
INDEX = "index"
SOURCE = "source"
ELEMENTS = "elements"

INPUTS = "inputs"
TARGETS = "targets"
OUTPUTS = "outputs"
LOSS_TERMS = "loss_terms"
METRIC_STATES = "metric_states"
PER_SAMPLE_LOSS = "per_sample_loss"
EXPLAIN = "explain"

LOGITS = "logits"
MASK = "mask"
ACTIVATED = "activated"
DECODED = "decoded"
