"""What a run's routing did, measured and shown.

    metrics   routing metrics and the evaluation accumulator (LayerAccumulator)
    report    a run directory's plots and report.md
"""
