"""Make twin-pair data: ``python -m cultureclip.curate stage=...``.

Stages run alone on the previous stage's output, or chained (``stage=all``); every stage writes
keyed, resumable records through :mod:`cultureclip.curate.runner`. The backends are real and swappable:
chat and vision-language models through any OpenAI-compatible server, images through diffusers.
Their packages come with ``pip install 'cultureclip[curate]'``.
"""
