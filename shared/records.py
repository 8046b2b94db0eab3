"""Names of the values exchanged between the ServerApp and the ClientApps, defined once.

The server puts these in each round's fit/evaluate config; clients put the
``METRIC_*`` keys in their replies. Keeping them here means a rename cannot
silently break one side.
"""

# Per-round config (server -> client)
CFG_SERVER_ROUND = "fedge-server-round"  # absolute round number, across resumes
CFG_PROXIMAL_MU = "proximal_mu"  # set by Flower's FedProx itself
CFG_ARTIFACT_JOB = "fedge-artifact-job"  # an artifact job's description (JSON; artifact_job)

# Reply metrics (client -> server)
METRIC_SITE = "site"
METRIC_LOSS = "loss"
METRIC_ACCURACY = "accuracy"
METRIC_BYTES_DOWN = "bytes-down"
METRIC_BYTES_UP = "bytes-up"
METRIC_EPSILON = "epsilon"  # record-level DP: this site's epsilon after this round
METRIC_EPSILON_NEXT = "epsilon-next"  # ... and after one more round (for the budget)
METRIC_DEVICE = "device"
METRIC_DP_SAMPLE_RATE = "dp-sample-rate"  # record-level DP: Poisson rate of this site's DP-SGD
METRIC_DP_STEPS = "dp-steps"  # ... and its DP-SGD steps in this round

# Node config keys (set by `fedge client start`, stay on the site)
NODE_DATA = "data"
NODE_SITE = "site"
NODE_LABEL_COLUMN = "label-column"
NODE_INIT_WEIGHTS = "init-weights"  # optional site-local copy of the run's init weights
NODE_POLICY = "policy"  # the site's privacy policy (TOML), enforced by the site
NODE_LEDGER = "ledger"  # the site's privacy ledger (JSON), composed across all runs

# Prefix of machine-readable progress lines the ServerApp prints for `fedge run`.
EVENT_PREFIX = "FEDGE-EVENT "
