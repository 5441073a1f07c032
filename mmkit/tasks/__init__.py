"""Builtin tasks, registered as the plugin ``mmkit.tasks``."""

from mmkit.hookspecs import hookimpl


@hookimpl
def register_tasks(register):
    from mmkit.tasks.classification import Classification
    from mmkit.tasks.clip_retrieval import ClipRetrieval
    from mmkit.tasks.linear_probe import LinearProbe
    from mmkit.tasks.pretrain import Pretrain
    from mmkit.tasks.zero_shot import ZeroShot

    register("clip_retrieval", ClipRetrieval)
    register("classification", Classification)
    register("zero_shot", ZeroShot)
    register("linear_probe", LinearProbe)
    register("pretrain", Pretrain)
