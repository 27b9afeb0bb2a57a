"""Applications on top of the library: the ``dmmd`` command line (:mod:`.cli`), the main job
``dmmd demo`` (:mod:`.demo`) and the exact-source distillation study (:mod:`.markov_study`).
May import every other part of ``dmmd``; nothing imports them."""
