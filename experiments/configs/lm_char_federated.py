"""`lm_char.py` trained federated on a play, one client per speaker (LEAF's Shakespeare).

Each of the play's speakers is a client holding its own speeches (partition `by_speaker`); a
round draws 10 of them in proportion to their amounts of text (`client_sampling='by_size'`),
each takes 10 local steps of Adam (lr 1e-3, gradients clipped to 1.0) on local batches of 2
windows of 64 characters, starting from the server's Adam moments (`client_moments=
'averaged'`), and the server applies the clients' mean update and keeps their mean moments
(FedAvg). 600 rounds see 600 x 10 x 10 x 2 = 120,000 windows: as many as `lm_char.py` at
batch 12 for 10,000 steps, the centralised run it is measured against (README, "Privacy").

    python -m experiments.train --config=experiments/configs/lm_char_federated.py \\
        --config.data.path=../shared/data/tinyshakespeare.txt --workdir=runs/lm_char_federated

User-level DP-FedAvg samples clients uniformly and keeps no moments: add
`--config.train.privacy.target_epsilon=E` (and a delta below one over the number of speakers,
e.g. `--config.train.privacy.delta=1e-3`) with `--config.train.federated.client_sampling=uniform
--config.train.federated.client_moments=fresh`.
"""

from experiments.configs import lm_char


def get_config():
    config = lm_char.get_config()
    config.train.update(steps=600, batch_size=2, log_every=60, steps_per_call=10)
    config.train.federated.update(clients_per_round=10, partition="by_speaker", local_steps=10,
                                  client_optimizer="adam", client_lr=1e-3,
                                  client_moments="averaged", client_sampling="by_size",
                                  server_optimizer="fedavg", server_lr=1.0)
    config.eval.update(every=60, steps=100, batch_size=12)  # lm_char.py's evaluation batches
    config.checkpoint.every = 60
    return config
