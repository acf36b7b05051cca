"""The GPTQ step: decoder layer by decoder layer on the calibration windows (pipeline/sequential.py
drives, algorithms/gptq_handler.py accumulates Hessians and rounds), after a memory/time plan;
with an output folder, a resume point is saved after every layer."""

from __future__ import annotations

from llmquant.config.recipe import GPTQConfig
from llmquant.quant.pipeline.context import StepContext

SEQUENTIAL_BATCH = 4  # calibration samples per forward call in layer-by-layer runs


def gptq_step(g: GPTQConfig, ctx: StepContext) -> None:
    from llmquant.arch.layers import find_decoder_layers
    from llmquant.quant.algorithms.gptq_handler import GPTQHandler, scale_dtype_for
    from llmquant.quant.pipeline import resume as resume_points
    from llmquant.quant.pipeline.memory_plan import check_plan, plan_sequential
    from llmquant.quant.pipeline.sequential import capture_first_inputs, run_sequential

    net, rec, plans, loaded, run = ctx.net, ctx.recipe, ctx.plans, ctx.loaded, ctx.run
    cal = rec.calibration
    batches = ctx.calibration_batches()
    plan = plan_sequential(net, batches.shape[0], batches.shape[1], SEQUENTIAL_BATCH, ctx.quantized)
    ctx.say(plan.describe())
    check_plan(plan)
    ctx.record("gptq", f"GPTQ Hessians ({g.describe()})", batches)
    fractions = None
    if rec.sparsity is not None:  # pruned inside this pass, on the same Hessians, before GPTQ rounds
        from llmquant.prune.sequential_prune import allocate, check_prunable

        pruned = {p.name: p.module for p in plans if p.scheme is not None}
        check_prunable(pruned, rec.sparsity)
        ctx.say(f"{rec.sparsity.describe()} inside the GPTQ pass, with the mask held fixed while rounding")
        fractions = allocate(net, pruned, rec.sparsity, batches, SEQUENTIAL_BATCH)
    handler = GPTQHandler(net, plans, g, loaded.source_dtype, moe_calibration=cal.moe_calibration,
                          min_expert_tokens=cal.min_expert_tokens, total_tokens=batches.numel(),
                          sparsity=rec.sparsity, fractions=fractions)
    _, layers = find_decoder_layers(net)
    device = next(net.parameters()).device
    inputs = capture_first_inputs(net, layers[0], batches, SEQUENTIAL_BATCH, device)
    start, writer = 0, None
    if run.output is not None:
        folder = resume_points.resume_dir(run.output)
        key = resume_points.resume_key(rec.to_dict(), loaded.source.describe(), batches)
        state = resume_points.load_resume_point(folder, key) if run.resume else None
        if state is not None:
            start, reports = resume_points.restore(net, folder, state, {p.name: p for p in plans},
                                                   lambda s: scale_dtype_for(s, loaded.source_dtype), inputs)
            handler.reports.update(reports)
            ctx.say(f"resuming at layer {start} of {len(layers)} from {folder}")
        else:
            if run.resume:
                ctx.say(f"no resume point in {folder}; starting from the first layer")
            resume_points.discard(folder)
        writer = resume_points.ResumeWriter(folder, key, handler.reports)
        # Once the checkpoint is complete, nothing is left to resume.
        ctx.after_save.append(lambda: resume_points.discard(folder))
    run_sequential(net, batches, handler, batch_size=SEQUENTIAL_BATCH, progress=ctx.progress, start_layer=start,
                   inputs=inputs, on_layer_done=writer)
    ctx.layer_reports.update(handler.reports)
    ctx.stats.update(handler.stats)

