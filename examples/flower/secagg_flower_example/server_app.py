"""ServerApp: FedAvg over the secure weighted sum; every round's DP-SGD spend goes to the ledger."""

from flwr.common import Context, ndarrays_to_parameters
from flwr.server import Grid, LegacyContext, ServerApp, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow

# The switch from Flower's SecAgg+: SecAggPlusWorkflow came from flwr.server.workflow.
from federation.flower import FlowerPrivacy, SecAggPlusWorkflow
from secagg_flower_example.task import accuracy, initial_arrays, settings, worst_case_spend

app = ServerApp()


def central_evaluation(server_round, parameters, config):
    acc, loss = accuracy(parameters)
    return loss, {"accuracy": acc}


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = settings(context.run_config)
    nodes = int(cfg["num-partitions"])
    strategy = FedAvg(
        fraction_fit=1.0, fraction_evaluate=0.0, min_available_clients=nodes, min_fit_clients=nodes,
        initial_parameters=ndarrays_to_parameters(initial_arrays()), evaluate_fn=central_evaluation,
    )
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=int(cfg["num-server-rounds"])),
                           strategy=strategy)
    sample_rate, steps = worst_case_spend(cfg)
    workflow = SecAggPlusWorkflow(
        num_shares=float(cfg["num-shares"]), reconstruction_threshold=float(cfg["reconstruction-threshold"]),
        max_weight=1000.0, clipping_range=8.0,
        privacy=FlowerPrivacy(
            noise_multiplier=float(cfg["noise-multiplier"]), sample_rate=sample_rate, steps=steps,
            max_grad_norm=float(cfg["max-grad-norm"]), delta=float(cfg["delta"]),
            budget_epsilon=float(cfg["budget-epsilon"]), ledger=str(cfg["ledger"]),
        ),
    )
    DefaultWorkflow(fit_workflow=workflow)(grid, legacy)
    for report in workflow.reports:
        print(f"round {report.round}: {len(report.included)} hospitals in the sum, dropped {report.dropped or 'none'}")
