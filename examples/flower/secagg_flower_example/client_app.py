"""ClientApp: DP-SGD on the hospital's own patients; the update leaves only masked."""

from flwr.client import ClientApp, NumPyClient
from flwr.common import Context

# The switch from Flower's SecAgg+: this line was `from flwr.client.mod import secaggplus_mod`.
from federation.flower import dp_metrics, secaggplus_mod
from secagg_flower_example.task import dp_sgd, local_training, partition_of, settings


class Hospital(NumPyClient):
    def __init__(self, pid: int, num_partitions: int, run_config) -> None:
        self.pid = pid
        self.x, self.y = partition_of(pid, num_partitions)
        self.local = local_training(run_config)

    def fit(self, parameters, config):
        arrays, update = dp_sgd(parameters, self.x, self.y, self.local, self.pid)
        # What this DP-SGD spent; the mod checks the server's ledger covers it, then drops every metric.
        spent = dp_metrics(noise_multiplier=self.local.noise_multiplier, sample_rate=update.sample_rate,
                           steps=update.steps, max_grad_norm=self.local.max_grad_norm)
        return arrays, len(self.y), spent


def client_fn(context: Context):
    pid = int(context.node_config["partition-id"])
    return Hospital(pid, int(context.node_config["num-partitions"]), settings(context.run_config)).to_client()


app = ClientApp(client_fn=client_fn, mods=[secaggplus_mod])
