//! Line and bar charts of norms, rendered with plotters to PNG or SVG (chosen by the file
//! extension). Text uses the embedded DejaVu Sans, so nothing depends on system fonts.

use std::io::Write;
use std::path::Path;
use std::sync::Once;

use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::error::ClipError;

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(0, 0, 0),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
];

/// One line of a [`LineChart`].
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Legend text.
    pub label: String,
    /// (x, y) points; non-finite ones (and, on a log axis, those <= 0) are left out.
    pub points: Vec<(f64, f64)>,
    /// Drawn dashed (thresholds).
    pub dashed: bool,
}

/// A line chart over steps: norms, losses, thresholds.
#[derive(Debug, Clone, PartialEq)]
pub struct LineChart {
    /// Caption.
    pub title: String,
    /// Horizontal axis name.
    pub x_label: String,
    /// Vertical axis name.
    pub y_label: String,
    /// Logarithmic vertical axis.
    pub log_y: bool,
    /// The lines, drawn in order.
    pub series: Vec<Series>,
}

/// Bars side by side per category (per layer: norm before and after clipping).
#[derive(Debug, Clone, PartialEq)]
pub struct BarChart {
    /// Caption.
    pub title: String,
    /// Vertical axis name.
    pub y_label: String,
    /// Logarithmic vertical axis.
    pub log_y: bool,
    /// Category names (layers).
    pub categories: Vec<String>,
    /// (legend text, one value per category) per bar of a category.
    pub bars: Vec<(String, Vec<f64>)>,
}

impl LineChart {
    /// An empty chart; add lines with [`LineChart::line`] and [`LineChart::dashed`].
    pub fn new(title: &str, x_label: &str, y_label: &str) -> LineChart {
        LineChart {
            title: title.into(),
            x_label: x_label.into(),
            y_label: y_label.into(),
            log_y: false,
            series: Vec::new(),
        }
    }

    /// With a logarithmic vertical axis.
    pub fn log_y(mut self, log_y: bool) -> Self {
        self.log_y = log_y;
        self
    }

    /// Adds a solid line.
    pub fn line(mut self, label: &str, points: Vec<(f64, f64)>) -> Self {
        self.series.push(Series {
            label: label.into(),
            points,
            dashed: false,
        });
        self
    }

    /// Adds a dashed line.
    pub fn dashed(mut self, label: &str, points: Vec<(f64, f64)>) -> Self {
        self.series.push(Series {
            label: label.into(),
            points,
            dashed: true,
        });
        self
    }

    /// Renders to `path` (`.png` or `.svg`).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<(), ClipError> {
        save(self, path.as_ref())
    }

    fn draw<DB: DrawingBackend, Y>(
        &self,
        root: &DrawingArea<DB, Shift>,
        points: &[Vec<(f64, f64)>],
        x: std::ops::Range<f64>,
        y: Y,
    ) -> Result<(), String>
    where
        Y: AsRangedCoord<Value = f64>,
        Y::CoordDescType: ValueFormatter<f64>,
    {
        let mut chart = frame(root, &self.title, x, y)?;
        chart
            .configure_mesh()
            .x_desc(&self.x_label)
            .x_label_formatter(&|v| short(*v))
            .y_desc(&self.y_label)
            .y_label_formatter(&|v| short(*v))
            .draw()
            .map_err(text)?;
        for (i, (s, pts)) in self.series.iter().zip(points).enumerate() {
            // Wide lines are drawn with miter joins, which spike at the sharp turns of
            // noisy series: dense series get a 1-pixel line.
            let width = if pts.len() > 100 { 1 } else { 2 };
            let style = COLORS[i % COLORS.len()].stroke_width(width);
            let pts = pts.iter().copied();
            let drawn = if s.dashed {
                chart.draw_series(DashedLineSeries::new(pts, 8, 5, style))
            } else {
                chart.draw_series(LineSeries::new(pts, style))
            };
            drawn
                .map_err(text)?
                .label(&s.label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 22, y)], style));
        }
        legend(&mut chart)
    }
}

impl BarChart {
    /// Renders to `path` (`.png` or `.svg`).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<(), ClipError> {
        save(self, path.as_ref())
    }

    fn draw<DB: DrawingBackend, Y>(
        &self,
        root: &DrawingArea<DB, Shift>,
        x: std::ops::Range<f64>,
        y: Y,
        base: f64,
    ) -> Result<(), String>
    where
        Y: AsRangedCoord<Value = f64>,
        Y::CoordDescType: ValueFormatter<f64>,
    {
        let mut chart = frame(root, &self.title, x, y)?;
        let names = &self.categories;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(names.len() + 1)
            .x_label_formatter(&|x| {
                let i = x.round();
                match names.get(i as usize) {
                    Some(name) if (x - i).abs() < 1e-6 && i >= 0.0 => name.clone(),
                    _ => String::new(),
                }
            })
            .y_desc(&self.y_label)
            .y_label_formatter(&|v| short(*v))
            .draw()
            .map_err(text)?;
        let width = 0.8 / self.bars.len().max(1) as f64;
        for (b, (label, values)) in self.bars.iter().enumerate() {
            let color = COLORS[b % COLORS.len()];
            let left = |i: usize| i as f64 - 0.4 + b as f64 * width;
            let rects = (values.iter().enumerate())
                .filter(|(_, v)| v.is_finite() && *v > &base)
                .map(|(i, &v)| {
                    let top = drawable(v, base > 0.0);
                    Rectangle::new([(left(i), base), (left(i) + width, top)], color.filled())
                });
            chart
                .draw_series(rects)
                .map_err(text)?
                .label(label)
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 14, y + 5)], color.filled())
                });
        }
        legend(&mut chart)
    }
}

/// The chart area every chart uses: caption, margins, axis label areas, coordinates.
fn frame<'a, DB: DrawingBackend, Y: AsRangedCoord<Value = f64>>(
    root: &'a DrawingArea<DB, Shift>,
    title: &str,
    x: std::ops::Range<f64>,
    y: Y,
) -> Result<ChartContext<'a, DB, Cartesian2d<RangedCoordf64, Y::CoordDescType>>, String> {
    ChartBuilder::on(root)
        .caption(title, ("sans-serif", 22))
        .margin(14)
        .x_label_area_size(40)
        .y_label_area_size(78)
        .build_cartesian_2d(x, y)
        .map_err(text)
}

/// The legend box of every chart, top right.
fn legend<'a, DB: DrawingBackend + 'a, Y: Ranged<ValueType = f64>>(
    chart: &mut ChartContext<'a, DB, Cartesian2d<RangedCoordf64, Y>>,
) -> Result<(), String> {
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(text)
}

/// Axis numbers: plain when moderate, scientific otherwise.
fn short(v: f64) -> String {
    if v == 0.0 || (1e-2..1e4).contains(&v.abs()) {
        format!("{}", (v * 1000.0).round() / 1000.0)
    } else {
        format!("{v:.0e}")
    }
}

fn text<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

/// The largest magnitude an axis draws, and the smallest a log axis draws: plotters
/// cannot lay out ticks over ranges that overflow or underflow f64 (it never returns), so
/// values beyond are drawn at the edge.
const DRAWABLE: f64 = 1e300;

/// Decades a log axis spans at the most.
const LOG_DECADES: i32 = 30;

/// `v` moved into the drawable range of a linear or log axis (finite values only).
fn drawable(v: f64, log: bool) -> f64 {
    let v = v.clamp(-DRAWABLE, DRAWABLE);
    if log {
        v.max(1.0 / DRAWABLE)
    } else {
        v
    }
}

/// A padded range around `values`; a default when there are none.
fn bounds(values: impl Iterator<Item = f64>, log: bool) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
        (a.min(v), b.max(v))
    });
    match (lo.is_finite(), log) {
        (false, true) => (1e-3, 1.0),
        (false, false) => (0.0, 1.0),
        // Plotters lays a log axis out decade by decade: at most LOG_DECADES of them, the
        // highest (smaller values sit below the axis).
        (true, true) => ((lo / 2.0).max(hi * 2.0 / 10f64.powi(LOG_DECADES)), hi * 2.0),
        (true, false) if hi > lo => (lo.min(0.0), hi + 0.05 * (hi - lo.min(0.0))),
        (true, false) => (lo.min(0.0), hi.abs().max(1e-12) * 1.05),
    }
}

/// Pixel size of every chart.
const SIZE: (u32, u32) = (800, 450);

impl Render for LineChart {
    fn render<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), String> {
        let keep =
            |&(x, y): &(f64, f64)| x.is_finite() && y.is_finite() && !(self.log_y && y <= 0.0);
        let points: Vec<Vec<(f64, f64)>> = (self.series.iter())
            .map(|s| {
                (s.points.iter().copied().filter(keep))
                    .map(|(x, y)| (drawable(x, false), drawable(y, self.log_y)))
                    .collect()
            })
            .collect();
        let all = points.iter().flatten();
        let (x0, x1) = bounds(all.clone().map(|p| p.0), false);
        let (y0, y1) = bounds(all.map(|p| p.1), self.log_y);
        if self.log_y {
            self.draw(root, &points, x0..x1, (y0..y1).log_scale())
        } else {
            self.draw(root, &points, x0..x1, y0..y1)
        }
    }
}

impl Render for BarChart {
    fn render<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), String> {
        let values = self.bars.iter().flat_map(|(_, v)| v.iter().copied());
        let values = values.filter(|v| v.is_finite() && !(self.log_y && *v <= 0.0));
        let (y0, y1) = bounds(values.map(|v| drawable(v, self.log_y)), self.log_y);
        let n = self.categories.len().max(1) as f64;
        if self.log_y {
            self.draw(root, -0.5..n - 0.5, (y0..y1).log_scale(), y0)
        } else {
            self.draw(root, -0.5..n - 0.5, 0.0..y1, 0.0)
        }
    }
}

/// A chart that can draw itself on any plotters backend.
trait Render {
    fn render<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), String>;
}

/// Creates the file, renders into a PNG or SVG backend by the extension, and writes it.
/// The file is created first, so an unwritable path fails before any drawing.
fn save(chart: &impl Render, path: &Path) -> Result<(), ClipError> {
    let fail = |reason: String| ClipError::Output {
        path: path.display().to_string(),
        reason,
    };
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    let png = match ext.as_deref() {
        Some("png") => true,
        Some("svg") => false,
        _ => return Err(fail("a plot file must end in .png or .svg".into())),
    };
    register_font();
    let file = std::fs::File::create(path).map_err(|e| fail(e.to_string()))?;
    let mut out = std::io::BufWriter::new(file);
    let (w, h) = SIZE;
    if png {
        let mut rgb = vec![0u8; (w * h * 3) as usize];
        {
            let root = BitMapBackend::with_buffer(&mut rgb, SIZE).into_drawing_area();
            root.fill(&WHITE).map_err(|e| fail(e.to_string()))?;
            chart.render(&root).map_err(fail)?;
            root.present().map_err(|e| fail(e.to_string()))?;
        }
        let mut encoder = png::Encoder::new(&mut out, w, h);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header().map_err(|e| fail(e.to_string()))?;
        writer
            .write_image_data(&rgb)
            .map_err(|e| fail(e.to_string()))?;
        writer.finish().map_err(|e| fail(e.to_string()))?;
    } else {
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
            root.fill(&WHITE).map_err(|e| fail(e.to_string()))?;
            chart.render(&root).map_err(fail)?;
            root.present().map_err(|e| fail(e.to_string()))?;
        }
        out.write_all(svg.as_bytes())
            .map_err(|e| fail(e.to_string()))?;
    }
    out.flush().map_err(|e| fail(e.to_string()))
}

/// Makes DejaVu Sans the "sans-serif" of every chart, once per process.
fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The embedded font is a valid TrueType file; a failure would only lose text.
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            dejavu::sans::regular(),
        );
    });
}
