"""Run the app with Flower's simulation engine from Python (``python -m secagg_flower_example.simulate``).

``flwr run .`` does the same from the command line with the settings in pyproject.toml.
"""

from flwr.simulation import run_simulation

from secagg_flower_example.client_app import app as client_app
from secagg_flower_example.server_app import app as server_app
from secagg_flower_example.task import DEFAULTS


def main() -> None:
    nodes = int(DEFAULTS["num-partitions"])
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=nodes,
                   backend_config={"client_resources": {"num_cpus": 1}})


if __name__ == "__main__":
    main()
