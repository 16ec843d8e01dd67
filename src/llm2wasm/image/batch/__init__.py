"""Many conversions from one spec (``models.toml``), on whatever runs them.

A spec lists models (a folder or a Hub id, optionally a PEFT adapter) with their quantizations and
settings, shared defaults, and the base URL the bundles will be served from. It is validated as a whole
(every problem listed, exit 2) and expanded into **items**: one model in one quantization each,
numbered from 0 in spec order. One item is the unit every engine runs, with one idempotent command:

    llm2wasm batch run models.toml --item N -o OUT      (N defaults to $JOB_COMPLETION_INDEX)

It converts item N into ``OUT/<model_id>/`` (a re-run of a finished item resumes in seconds, as
``llm2wasm convert`` does); ``OUT/.batch/item-N.json`` says ``running`` before it starts and its
outcome when it ends (llm2wasm.image.batch.status). A failed item keeps its logs in its bundle folder and
touches no other. ``llm2wasm batch collect`` then writes one WebLLM ``AppConfig`` of every bundle
that is complete and a JSON report. The same items feed a GitHub Actions matrix (``batch matrix``)
and a Kubernetes Indexed Job (``batch k8s``, llm2wasm.image.batch.k8s).

The package, by job: ``spec`` (parse and check a spec into items), ``command`` (the
``llm2wasm batch`` steps), ``status`` (an item's status file, its outcome, ``collect``),
``github`` (the Actions matrix) and ``k8s`` (the Indexed Job). The host's local runner, which
starts one container per item, is llm2wasm.host.batchrun.

Runs in the image (standard library only).
"""
