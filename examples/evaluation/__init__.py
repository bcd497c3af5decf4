"""The evaluation shared by ``examples/train_student.py`` and ``examples/benchmark.py``.

- ``students``: the student networks (ConvNet-3, ResNet-8, MLP, ViT), no torchvision;
- ``protocols``: the three training protocols (``stored``, ``teacher``, ``hard``) and the training loop,
  which reads every dataset through ``DataLoader`` as users do;
- ``heldout``: the held-out set of an archive, mapped by its class ids or names (never by sorted order);
- ``baselines``: real-image baselines (random subsets, RDED-style real-patch collages, the full split);
- ``metrics``: storage bytes, mean ± std, DD-Ranking's HLR / IOR / LRS;
- ``builds``: the benchmark's archives, one cached ``d3m-build`` per setting;
- ``runner``: student runs as cached jobs in a pool of single-threaded processes;
- ``report``: the Markdown tables, the JSON and the plot;
- ``builder_adapter``: the only module that imports ``builder``.
"""
