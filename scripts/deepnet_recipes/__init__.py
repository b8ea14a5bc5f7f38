"""Paper recipes of deepnet-fairseq (WMT-17 En-De, IWSLT-14 De-En, OPUS-100): shared code.

Every recipe is a list of shell commands (fetch, extract, tokenize, ..., fairseq-*); the runner in
:mod:`deepnet_recipes.common` prints them with ``--dry-run``, skips those already done (stamp files
keyed on the exact command) and stops at the first failure with the command's log tail.
The ``.sh`` wrappers in ``scripts/wmt17``, ``scripts/iwslt14`` and ``scripts/opus100`` call
``python -m deepnet_recipes.<recipe> <action>``; the text-processing steps are subcommands of
``python -m deepnet_recipes.tools`` so that every printed command can be run by hand.
"""
