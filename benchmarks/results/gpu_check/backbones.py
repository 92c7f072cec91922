"""Every backbone through the CUDA-graph step on 3BPA: epoch seconds eager vs graph, and the
validation force MAE after two epochs (must match)."""
import json, sys, traceback
from pathlib import Path
sys.path.insert(0, "benchmarks")
from gpu_timing import train_epochs
out = {}
for backbone in ("schnet", "egnn", "ace", "deepset-moe", "painn"):
    for graphs in ("never", "always"):
        key = f"{backbone} {graphs}"
        try:
            r = train_epochs(Path(".gpu-data/3bpa/train_300K.xyz"), "cuda", backbone=backbone,
                             batch_size=4, epochs=3, max_train=200, graphs=graphs)
            out[key] = r
            print(key, r["epoch_seconds"], r["val_forces_mae"], flush=True)
        except Exception as err:
            out[key] = {"error": f"{type(err).__name__}: {err}", "tb": traceback.format_exc()[-2500:]}
            print(key, "FAILED", out[key]["tb"], flush=True)
    Path(sys.argv[1]).write_text(json.dumps(out, indent=1))
