#!/usr/bin/env bash
# One-shot GPU check for the device machine (not CI): CUDA tests, the suite, GPU benchmarks.
export PYTHONPATH=$PWD/src:$PWD/tests PYTHONUNBUFFERED=1
O=${OUT:-/tmp/out}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, scipy, numpy; print('torch', torch.__version__, 'scipy', scipy.__version__, 'numpy', numpy.__version__)"
timeout 120 python3 -m pytest tests/test_cuda.py -q -p no:cacheprovider 2>&1 | tee $O/cuda_tests.txt | tail -15
timeout 120 python3 -m pytest tests -q -x -p no:cacheprovider -m "not slow" 2>&1 | tail -4 | tee $O/suite.txt
timeout 100 python3 benchmarks/bench_hvp.py --device cuda --resnet --repeat 10 2>&1 | tee $O/hvp_cuda.txt
timeout 90 python3 benchmarks/bench_spectrum.py 2048 --device cuda 2>&1 | tee $O/spectrum_cuda.txt
timeout 45 python3 benchmarks/bench_sharpness.py --device cuda --rounds 3 2>&1 | tee $O/sharpness_cuda.txt
timeout 60 python3 benchmarks/bench_landscape.py --device cuda --rounds 3 --steps 11 2>&1 | tee $O/landscape_cuda.txt
timeout 60 python3 examples/batch_size_study.py --quick --device cuda --out /tmp/study 2>&1 | tail -4 | tee $O/study.txt; cp /tmp/study/README.md $O/study_report.md
