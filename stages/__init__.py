"""The DVC stage scripts, each run as `python -m stages.<verb>` (dvc.yaml).

Python imports this package before the stage module, so this is the one place that runs before any
TensorFlow import in a stage process: TensorFlow reads its C++ log level when it loads, and its
start-up lines are written the moment it does (tapework/quiet.py), and the import hook that skips
Keras's optional integrations must be in place before it loads (tapework/lean_import.py). Import
nothing else here.
"""

from tapework.lean_import import skip_keras_extras
from tapework.quiet import quiet_stage_process

quiet_stage_process()
skip_keras_extras()
