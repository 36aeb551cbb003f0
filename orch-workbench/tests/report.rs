//! What an experiment writes: the curves, the table and (feature `plots`) the plots.

use std::sync::Arc;

use orch_workbench::{Experiment, NodeRow, Policy, TaskRow, Trace, report};

fn trace() -> Arc<Trace> {
    let nodes = (0..4)
        .map(|i| NodeRow { name: format!("n{i}"), cpu_milli: 32_000, memory_mib: 65_536, gpus: 4, model: "T4".into() })
        .collect();
    let tasks = (0..30)
        .map(|i| TaskRow {
            name: format!("t{i}"),
            cpu_milli: 2000,
            memory_mib: 1024,
            num_gpu: (i % 3 != 0) as u32,
            gpu_milli: if i % 3 == 0 {
                0
            } else if i % 3 == 1 {
                400
            } else {
                1000
            },
            gpu_spec: vec![],
            creation: None,
            deletion: None,
        })
        .collect();
    Arc::new(Trace { nodes, tasks, name: "tiny".into() })
}

#[test]
fn writes_curves_tables_and_plots() {
    let trace = trace();
    let experiments: Vec<Experiment> = [Policy::Fgd, Policy::BestFit]
        .into_iter()
        .flat_map(|p| (1..4).map(move |s| (p, s)))
        .map(|(p, s)| Experiment::new(trace.clone(), p, s))
        .collect();
    let runs = report::run_all(&experiments, 2, &|_, _, _| {});
    assert_eq!(runs.len(), 6);
    assert_eq!((runs[0].policy, runs[0].seed, runs[5].policy, runs[5].seed), (Policy::Fgd, 1, Policy::BestFit, 3));
    let dir = std::env::temp_dir().join(format!("orch-workbench-report-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let written = match report::write_all(&dir, &runs, true, false) {
        Ok(w) => w,
        Err(e) if e.to_string().contains("no TrueType font") => {
            println!("writes_curves_tables_and_plots: plots skipped: {e}");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    let table = std::fs::read_to_string(dir.join("table.md")).unwrap();
    assert!(table.contains("| FGD | 3 |") && table.contains("| BestFit | 3 |"), "{table}");
    let curves = std::fs::read_to_string(dir.join("curves.csv")).unwrap();
    assert!(curves.starts_with("policy,seeds,arrived_pct,unallocated_gpu_pct_median"), "{curves}");
    assert!(curves.lines().any(|l| l.starts_with("FGD,3,130,")), "a point at 130% arrived");
    assert!(dir.join("runs/FGD-seed2.csv").is_file() && dir.join("steps/BestFit-seed1.csv").is_file());
    if cfg!(feature = "plots") {
        let png = std::fs::read(dir.join("unallocated.png")).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        let svg = std::fs::read_to_string(dir.join("fragmented.svg")).unwrap();
        assert!(svg.contains("<svg") && svg.contains("FGD") && svg.contains("BestFit"));
    }
    assert!(written.len() >= 6 + 6 + 3);
    let _ = std::fs::remove_dir_all(&dir);
}
