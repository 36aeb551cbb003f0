//! The openb trace as the FGD paper uses it: the GPU nodes, the task lists, the typical shapes.
//! Skipped, saying so, when the trace is not there (`$ORCH_OPENB_DIR`, else
//! `shared/data/openb` beside the workspace).

use orch_workbench::trace::OPENB_NODES;
use orch_workbench::{TaskKind, Trace, openb_dir};

/// The trace folder, or `None` (after saying the test is skipped) when it is missing.
fn trace_dir(test: &str) -> Option<std::path::PathBuf> {
    let dir = openb_dir();
    if dir.join(OPENB_NODES).is_file() {
        Some(dir)
    } else {
        println!("{test}: skipped: the openb trace is not at {} (set ORCH_OPENB_DIR)", dir.display());
        None
    }
}

#[test]
fn the_default_trace_is_the_papers_cluster_and_workload() {
    let Some(dir) = trace_dir("the_default_trace_is_the_papers_cluster_and_workload") else { return };
    let t = Trace::openb(&dir, "default").expect("default trace");
    assert_eq!(t.nodes.len(), 1213);
    assert_eq!(t.gpu_capacity_milli(), 6_212_000);
    assert_eq!(t.tasks.len(), 8152);
    assert_eq!(t.gpu_requested_milli(), 6_086_800);
    let count = |k| t.tasks.iter().filter(|x| x.kind() == k).count();
    assert_eq!((count(TaskKind::Cpu), count(TaskKind::Share)), (1088, 3078));
    // 35 shapes cover 7,766 of 8,152 tasks (95.26%); the most frequent is 3,152 mCPU with 0.81
    // of one GPU (1,047 tasks).
    let typical = t.typical_shapes(0.95);
    assert_eq!(typical.shapes().len(), 35);
    let (top, p) = &typical.shapes()[0];
    assert_eq!((top.cpu_milli, top.gpu_milli, top.gpus), (3152, 810, 1));
    assert!((p - 1047.0 / 7766.0).abs() < 1e-9, "{p}");
}

#[test]
fn every_variant_loads() {
    let Some(dir) = trace_dir("every_variant_loads") else { return };
    for variant in ["gpushare20", "multigpu20", "gpuspec33", "cpu100"] {
        let t = Trace::openb(&dir, variant).unwrap_or_else(|e| panic!("{variant}: {e}"));
        assert!(t.tasks.len() > 7000, "{variant}: {} tasks", t.tasks.len());
        assert_eq!(t.nodes.len(), 1213);
    }
    let spec = Trace::openb(&dir, "gpuspec33").expect("gpuspec33");
    assert_eq!(spec.tasks.iter().filter(|t| !t.gpu_spec.is_empty()).count(), 2388, "tasks bound to GPU models");
}
