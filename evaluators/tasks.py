"""The evaluation tasks, registered with the core's task registry (`sslbench eval TASK`).

Each runs as `run(ctx) -> TaskOutput` inside evaluators/run.py's frame, which loads the backbone
and the data and turns the output into a result record. Ranked by test-set top-1.
"""

from sslbench.tasks import Task, register_task

register_task(
    Task(
        name="knn",
        command="eval",
        summary="weighted kNN on frozen features (faiss)",
        config="evaluators.config:knn_config",
        run="evaluators.knn:run",
        metric="top1",
    )
)
register_task(
    Task(
        name="linear",
        command="eval",
        summary="linear probe: fast (cached features) or standard (frozen backbone, augmented)",
        config="evaluators.config:linear_config",
        run="evaluators.linear:run",
        metric="top1",
    )
)
register_task(
    Task(
        name="semisup",
        command="eval",
        summary="fine-tune the whole network on 1% / 10% of the labels",
        config="evaluators.config:semisup_config",
        run="evaluators.semisup:run",
        metric="top1",
    )
)
