//! The paper's plots (PNG and SVG, with plotters): unallocated and fragmented GPU % against
//! arrived GPU %, one line per policy (the median over seeds), the middle half of the seeds
//! shaded.
//!
//! Text needs a TrueType font, found at run time: `$ORCH_PLOT_FONT`, else DejaVu Sans or Liberation
//! Sans where Linux distributions put them (Debian: `fonts-dejavu-core`), else Arial on macOS
//! and Windows.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::metrics::{FRAGMENTED, Summary, UNALLOCATED};
use crate::report::ReportError;

/// Where fonts are looked for, after `$ORCH_PLOT_FONT`.
pub const FONT_PATHS: [&str; 7] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation-sans/LiberationSans-Regular.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
];

/// Finds and registers a font once; the error says where it looked.
fn font() -> Result<(), String> {
    static FONT: OnceLock<Result<(), String>> = OnceLock::new();
    FONT.get_or_init(|| {
        let env = std::env::var_os("ORCH_PLOT_FONT").map(PathBuf::from);
        let candidates: Vec<PathBuf> = env.iter().cloned().chain(FONT_PATHS.iter().map(PathBuf::from)).collect();
        for p in &candidates {
            if let Ok(bytes) = std::fs::read(p) {
                // Registered once for the whole process: the font lives as long as it.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return Ok(());
                }
            }
        }
        let tried: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
        Err(format!("no TrueType font for the plots' text (set ORCH_PLOT_FONT; tried {})", tried.join(", ")))
    })
    .clone()
}

/// What one plot shows.
struct Spec {
    metric: usize,
    stem: &'static str,
    title: &'static str,
    y_label: &'static str,
    x: (u32, u32),
    y: (f64, f64),
    ideal: bool,
}

const SPECS: [Spec; 2] = [
    Spec {
        metric: UNALLOCATED,
        stem: "unallocated",
        title: "Unallocated GPUs (median of seeds, middle half shaded)",
        y_label: "Unallocated GPU (%)",
        x: (75, 130),
        y: (0.0, 25.0),
        ideal: true,
    },
    Spec {
        metric: FRAGMENTED,
        stem: "fragmented",
        title: "Fragmented GPUs (median of seeds, middle half shaded)",
        y_label: "Fragmented GPU (% of capacity)",
        x: (0, 130),
        y: (0.0, 20.0),
        ideal: false,
    },
];

/// Line colours, one per policy (seaborn's default palette).
const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// Draws `unallocated.{png,svg}` and `fragmented.{png,svg}` into `dir`; returns the files.
pub fn plot_all(dir: &Path, summaries: &[Summary]) -> Result<Vec<PathBuf>, ReportError> {
    let mut written = Vec::new();
    for spec in &SPECS {
        let png = dir.join(format!("{}.png", spec.stem));
        let svg = dir.join(format!("{}.svg", spec.stem));
        font().map_err(|reason| ReportError::Plot { path: png.clone(), reason })?;
        let size = (1000, 560);
        draw(BitMapBackend::new(&png, size).into_drawing_area(), summaries, spec)
            .map_err(|reason| ReportError::Plot { path: png.clone(), reason })?;
        draw(SVGBackend::new(&svg, size).into_drawing_area(), summaries, spec)
            .map_err(|reason| ReportError::Plot { path: svg.clone(), reason })?;
        written.push(png);
        written.push(svg);
    }
    Ok(written)
}

fn draw<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, summaries: &[Summary], spec: &Spec) -> Result<(), String> {
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    root.fill(&WHITE).map_err(err)?;
    let (x0, x1) = (spec.x.0 as f64, spec.x.1 as f64);
    let (y0, y1) = spec.y;
    let mut chart = ChartBuilder::on(&root)
        .caption(spec.title, ("sans-serif", 22))
        .margin(14)
        .x_label_area_size(46)
        .y_label_area_size(58)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("Arrived workloads (% of cluster GPU capacity)")
        .y_desc(spec.y_label)
        .label_style(("sans-serif", 16))
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(err)?;
    let clamp = |v: f64| v.clamp(y0, y1);
    let inside = |x: u32| x >= spec.x.0 && x <= spec.x.1;
    if spec.ideal {
        let ideal: Vec<(f64, f64)> = (spec.x.0..=spec.x.1).map(|x| (x as f64, clamp(100.0 - x as f64))).collect();
        chart
            .draw_series(DashedLineSeries::new(ideal, 6, 4, RGBColor(128, 128, 128).stroke_width(1)))
            .map_err(err)?
            .label("Ideal")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 22, y)], RGBColor(128, 128, 128)));
    }
    for (i, s) in summaries.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let pts: Vec<(u32, f64, f64, f64)> = s
            .points
            .iter()
            .filter(|p| inside(p.0))
            .map(|p| (p.0, clamp(p.1[spec.metric].median), clamp(p.1[spec.metric].low), clamp(p.1[spec.metric].high)))
            .collect();
        if pts.is_empty() {
            continue;
        }
        let band: Vec<(f64, f64)> =
            pts.iter().map(|p| (p.0 as f64, p.3)).chain(pts.iter().rev().map(|p| (p.0 as f64, p.2))).collect();
        chart.draw_series(std::iter::once(Polygon::new(band, color.mix(0.2).filled()))).map_err(err)?;
        chart
            .draw_series(LineSeries::new(pts.iter().map(|p| (p.0 as f64, p.1)), color.stroke_width(2)))
            .map_err(err)?
            .label(format!("{}", s.policy))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 22, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .label_font(("sans-serif", 16))
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(200, 200, 200))
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)
}
