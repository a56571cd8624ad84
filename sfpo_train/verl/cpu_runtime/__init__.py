"""verl 0.9.1 on a host without an accelerator: a platform, a training engine and a rollout server.

Nothing here is SFPO; it is what lets verl's whole Ray job (``trainer.device=cpu``)
and the tests run on CPU. None of it is loaded by the ``verl.plugins`` entry point
(:mod:`sfpo_train.verl.plugin`): a module registers itself with verl when it is
imported, and it is imported only where a run asks for it.

- :mod:`~sfpo_train.verl.cpu_runtime.platform`: verl platform ``"cpu"``
  (``VERL_PLATFORM=cpu``);
- :mod:`~sfpo_train.verl.cpu_runtime.engine`: :func:`use_cpu`, which sets a
  process up for verl on CPU (platform, FSDP engine for device ``"cpu"``, gloo
  process group); our worker calls it in its Ray process;
- :mod:`~sfpo_train.verl.cpu_runtime.hf_rollout`: ``rollout.name=hf``, a
  transformers rollout server (CPU runs, and GPU hosts without vLLM/SGLang);
- :mod:`~sfpo_train.verl.cpu_runtime.mode`: the driver's side of
  ``trainer.device=cpu`` (defaults of the mode, the environment of every process).

Where it is registered: the driver of ``python -m sfpo_train.verl.main`` imports
what the config asks for (``trainer.device=cpu``: platform and rollout;
``rollout.name=hf``: the rollout) and names the same modules in
``VERL_USE_EXTERNAL_MODULES`` in Ray's ``runtime_env``, which verl imports in
every process of the job when that process imports verl.

Importing this package imports neither verl nor its submodules.
"""

PLATFORM_ENV = "VERL_PLATFORM"
MODULES_ENV = "VERL_USE_EXTERNAL_MODULES"  # verl/__init__ imports these in every process, whatever the plugin policy
PLATFORM_MODULE = "sfpo_train.verl.cpu_runtime.platform"
ROLLOUT_MODULE = "sfpo_train.verl.cpu_runtime.hf_rollout"
