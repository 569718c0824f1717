"""The application: the `veralab` command (fine-tune, evaluate, merge, export-lora, count).

It is built on the library: it imports `veralab.config`, `veralab.targets`, `veralab.counting` and
`veralab.fast`, while the library never imports it. The modules, by job:

    cli            the command line: arguments, the commands, one-line errors
    finetune       the main job: load, evaluate, train, evaluate, save, summarize
    train          the training loop (one process or several)
    evaluate       held-out exact match by greedy generation
    data           the embedded alarm task, JSON-lines files, tokenization and batching
    base_model     the base model from a local directory, optionally quantized
    default_model  the embedded default model, fetched from PyPI and converted once
    distributed    the training processes under torchrun
    report         the summary table, the loss curve and summary.json
"""
