"""The parts :mod:`gptlab.train` is built from.

``gptlab/train.py`` is the story a reader follows: ``build`` (set-up, once) then ``Trainer.fit`` (the
loop). What it calls lives here, so the story stays short: ``setup.py`` (data, resume rules, initial
weights, run-dir files, banner, signals) and ``state.py`` (the checkpoint as named parts with
``state_dict()`` / ``load_state_dict()``). How the model is spread over ranks is ``gptlab.dist.Parallel``;
the evaluations are the registry in ``gptlab.evals.registry``; test fault points are ``gptlab.hooks``.
"""
