//! The gradient monitor: asynchronous collection in step order, norms before and after,
//! CSV / JSON lines / PNG / SVG outputs, and unwritable paths as typed errors.

mod common;

use common::{close, gpu, gpu_tensors, upload, write, Host};
use gradclip::{
    Backend, ClipError, ClipPolicy, ClipReport, Clipper, CpuClipper, GpuClipper, GradMonitor, Rule,
    TensorInfo,
};

fn out_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("gradclip-monitor-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Steps whose total norms are 0.5, 2, 4, 8, 16, 32 (tensors [3k, 4k] and [0, 0]).
fn steps() -> Vec<Vec<Host>> {
    [0.1f32, 0.4, 0.8, 1.6, 3.2, 6.4]
        .iter()
        .map(|&k| vec![Host::F32(vec![3.0 * k, 4.0 * k]), Host::F32(vec![0.0; 3])])
        .collect()
}

fn infos() -> Vec<TensorInfo> {
    vec![
        TensorInfo::new("rnn.w_hh", &[2]),
        TensorInfo::new("head, \"bias\"", &[3]),
    ]
}

/// The GPU run, tracked asynchronously with at most 2 reports in flight.
fn monitored_gpu_run() -> GradMonitor {
    let ctx = gpu();
    let steps = steps();
    let arena = upload(&ctx, &steps[0]);
    let policy = ClipPolicy::new(Rule::GlobalNorm(1.0)).with_group_report();
    let mut run = GpuClipper::new(
        &ctx,
        &gpu_tensors(&arena, &steps[0], &infos()),
        None,
        policy,
    )
    .unwrap();
    let mut monitor = GradMonitor::new().max_in_flight(2);
    for g in &steps {
        write(&ctx, &arena, g);
        monitor.track(run.step().unwrap()).unwrap();
        assert!(monitor.in_flight() <= 2);
    }
    monitor.flush().unwrap();
    assert_eq!(monitor.in_flight(), 0);
    monitor
}

fn check_records(records: &[ClipReport]) {
    let norms = [0.5, 2.0, 4.0, 8.0, 16.0, 32.0];
    assert_eq!(records.len(), norms.len());
    for (i, (r, n)) in records.iter().zip(norms).enumerate() {
        assert_eq!(r.step, i as u64, "step order");
        assert!(close(r.total_norm, n, 1e-6), "{r:?}");
        // PyTorch: coef = min(1 / (n + 1e-6), 1).
        let after = if n > 1.0 { n / (n + 1e-6) } else { n };
        assert!(close(r.total_norm_after.unwrap(), after, 1e-6), "{r:?}");
        assert_eq!(r.threshold, Some(1.0));
        assert_eq!(r.clipped_units > 0, n > 1.0);
        let t = r.tensors.as_ref().unwrap();
        assert_eq!(t.len(), 2);
        assert!(close(t[0].norm, n, 1e-6) && close(t[0].norm_after, after, 1e-6));
        assert_eq!((t[1].norm, t[1].norm_after), (0.0, 0.0));
    }
}

#[test]
fn gpu_reports_are_collected_in_order_and_match_the_cpu() {
    let monitor = monitored_gpu_run();
    check_records(monitor.records());
    let mut cpu = CpuClipper::new(
        ClipPolicy::new(Rule::GlobalNorm(1.0)).with_group_report(),
        &infos(),
    )
    .unwrap();
    let mut cpu_monitor = GradMonitor::new();
    for mut g in steps() {
        cpu_monitor.record(cpu.step(&mut common::muts(&mut g), None).unwrap());
    }
    check_records(cpu_monitor.records());
}

#[test]
fn global_clip_reports_are_monitored_on_both_backends() {
    let ctx = gpu();
    let steps = steps();
    let arena = upload(&ctx, &steps[0]);
    // Unnamed tensors (`#0`, `#1`), a global chain built by `ClipPolicy::global_norm`.
    let tensors = common::tensors(&arena, &steps[0]);
    let clip = ClipPolicy::global_norm(1.0).with_group_report();
    let mut batch = GpuClipper::new(&ctx, &tensors, None, clip.clone()).unwrap();
    let mut on_gpu = GradMonitor::new().max_in_flight(2);
    let mut on_cpu = GradMonitor::new();
    // A runner numbers its global steps, as the GPU runner does.
    let unnamed = TensorInfo::unnamed(steps[0].iter().map(|t| t.as_ref().len()));
    let mut cpu = Clipper::new(Backend::Cpu, clip, &unnamed).unwrap();
    for g in &steps {
        write(&ctx, &arena, g);
        on_gpu.track(batch.step().unwrap()).unwrap();
        let mut h = g.clone();
        let report = cpu.step(&mut common::muts(&mut h), None);
        on_cpu.record(report.unwrap());
    }
    on_gpu.flush().unwrap();
    check_records(on_gpu.records());
    check_records(on_cpu.records());
    let stage = &on_gpu.records()[3].stages[0];
    assert_eq!((stage.threshold, stage.clipped_units), (Some(1.0), 2));
}

#[test]
fn csv_and_jsonl_hold_every_step() {
    let monitor = monitored_gpu_run();
    let dir = out_dir("formats");
    monitor.write_csv(dir.join("steps.csv")).unwrap();
    let csv = std::fs::read_to_string(dir.join("steps.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(
        lines[0],
        "step,total_norm,total_norm_after,threshold,coef,clipped,clipped_units,units,skipped,non_finite,nans_zeroed,loss_scale"
    );
    assert_eq!(lines.len(), 7);
    let row: Vec<&str> = lines[4].split(',').collect();
    assert_eq!(row[0], "3");
    assert!(close(row[1].parse().unwrap(), 8.0, 1e-6));
    assert!(close(row[2].parse().unwrap(), 1.0, 1e-6));
    assert_eq!((row[3], row[5], row[8]), ("1", "true", "false"));
    assert_eq!(row[11], "", "no loss scale without loss scaling");
    assert!(close(row[4].parse().unwrap(), 0.125, 1e-6));
    assert_eq!(
        lines[1].split(',').nth(5),
        Some("false"),
        "step 0 is not clipped"
    );

    monitor.write_tensor_csv(dir.join("tensors.csv")).unwrap();
    let t = std::fs::read_to_string(dir.join("tensors.csv")).unwrap();
    let t: Vec<&str> = t.lines().collect();
    assert_eq!(t[0], "step,tensor,norm,norm_after");
    assert_eq!(t.len(), 1 + 2 * 6);
    assert!(t[1].starts_with("0,rnn.w_hh,0.5"), "{}", t[1]);
    assert!(t[2].starts_with("0,\"head, \"\"bias\"\"\",0,0"), "{}", t[2]);

    monitor.write_jsonl(dir.join("steps.jsonl")).unwrap();
    let text = std::fs::read_to_string(dir.join("steps.jsonl")).unwrap();
    let objects: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect();
    assert_eq!(objects.len(), 6);
    let last = &objects[5];
    assert_eq!(last["step"], 5);
    assert!(close(last["total_norm"].as_f64().unwrap(), 32.0, 1e-6));
    assert_eq!(last["clipped"], true);
    assert_eq!(last["tensors"][1]["name"], "head, \"bias\"");
    assert!(close(
        last["tensors"][0]["norm_after"].as_f64().unwrap(),
        1.0,
        1e-6
    ));
    assert_eq!(last["groups"][0]["name"], "all");
    assert!(close(
        last["groups"][0]["coef"].as_f64().unwrap(),
        1.0 / 32.0,
        1e-6
    ));
}

#[cfg(feature = "plot")]
#[test]
fn plots_are_written_as_png_and_svg() {
    let monitor = monitored_gpu_run();
    let dir = out_dir("plots");
    for log in [false, true] {
        let png = dir.join(format!("norms-{log}.png"));
        monitor.plot_norms(&png, log).unwrap();
        let decoder =
            png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&png).unwrap()));
        let reader = decoder.read_info().unwrap();
        assert_eq!((reader.info().width, reader.info().height), (800, 450));
        let svg = dir.join(format!("layers-{log}.svg"));
        monitor.plot_layers(&svg, log).unwrap();
        let text = std::fs::read_to_string(&svg).unwrap();
        assert!(
            text.starts_with("<svg") && text.contains("rnn.w_hh"),
            "{text:.200}"
        );
        assert!(text.contains("Per-layer gradient norm, step 5"));
    }
    let svg = dir.join("norms.svg");
    monitor.plot_norms(&svg, true).unwrap();
    let text = std::fs::read_to_string(&svg).unwrap();
    for label in ["before clipping", "after clipping", "threshold"] {
        assert!(text.contains(label), "legend {label}");
    }
    monitor.plot_layers(dir.join("layers.png"), false).unwrap();
}

#[test]
fn unwritable_paths_are_typed_errors() {
    let monitor = monitored_gpu_run();
    let missing = std::env::temp_dir()
        .join("gradclip-no-such-dir-7f3a")
        .join("x");
    #[allow(unused_mut)]
    let mut checks: Vec<(&str, Result<(), ClipError>)> = vec![
        ("csv", monitor.write_csv(missing.with_extension("csv"))),
        (
            "tensor csv",
            monitor.write_tensor_csv(missing.with_extension("csv")),
        ),
        (
            "jsonl",
            monitor.write_jsonl(missing.with_extension("jsonl")),
        ),
    ];
    #[cfg(feature = "plot")]
    checks.extend([
        (
            "png",
            monitor.plot_norms(missing.with_extension("png"), false),
        ),
        (
            "svg",
            monitor.plot_layers(missing.with_extension("svg"), false),
        ),
    ]);
    for (what, r) in checks {
        match r {
            Err(ClipError::Output { path, .. }) => assert!(path.contains("gradclip-no-such-dir")),
            other => panic!("{what}: {other:?}"),
        }
    }
}

#[cfg(feature = "plot")]
#[test]
fn a_plot_path_needs_png_or_svg() {
    let monitor = monitored_gpu_run();
    let dir = out_dir("ext");
    let e = monitor
        .plot_norms(dir.join("norms.jpg"), false)
        .unwrap_err();
    assert!(e.to_string().contains(".png or .svg"), "{e}");
    assert!(!dir.join("norms.jpg").exists());
}

/// Values an axis cannot lay out (beyond f64's range when padded, subnormal on a log axis)
/// are drawn at the edge: every chart finishes. A hang fails the test after a minute.
#[cfg(feature = "plot")]
#[test]
fn charts_of_extreme_values_finish() {
    use gradclip::plot::{BarChart, LineChart};
    let dir = out_dir("extreme");
    let (done, wait) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let extremes = [
            vec![(0.0, 1e308), (1.0, 1.0)],
            vec![(0.0, 1e-320), (1.0, 2.0)],
            vec![(-1e308, 1.0), (1e308, 2.0)],
            vec![(0.0, f64::MAX), (1.0, f64::MIN_POSITIVE), (2.0, -f64::MAX)],
            vec![(5.0, 1e-300), (5.0, 1e-300)],
            vec![
                (0.0, f64::NAN),
                (f64::INFINITY, 1.0),
                (1.0, f64::NEG_INFINITY),
            ],
        ];
        for (i, points) in extremes.into_iter().enumerate() {
            for log in [false, true] {
                let ys: Vec<f64> = points.iter().map(|p| p.1).collect();
                let line = LineChart::new("extreme", "x", "y")
                    .log_y(log)
                    .line("a", points.clone());
                line.save(dir.join(format!("line-{i}-{log}.png"))).unwrap();
                let bars = BarChart {
                    title: "extreme".into(),
                    y_label: "y".into(),
                    log_y: log,
                    categories: (0..ys.len()).map(|k| format!("c{k}")).collect(),
                    bars: vec![("v".into(), ys)],
                };
                bars.save(dir.join(format!("bars-{i}-{log}.svg"))).unwrap();
            }
        }
        done.send(()).unwrap();
    });
    wait.recv_timeout(std::time::Duration::from_secs(60))
        .expect("every chart finishes");
}
