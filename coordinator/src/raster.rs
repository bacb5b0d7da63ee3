//! Charts as PNG, for the places an SVG does not go (a slide deck, a manuscript system that takes
//! bitmaps): a small rasterizer with its own 5×7 bitmap font, so that no font file, system font or
//! renderer is needed. The page's charts stay SVG ([`crate::report`]); this draws the same chart
//! (the same ranges, ticks, colours and legend) at twice the SVG's size.

use image::{Rgb, RgbImage};

/// A glyph: rows top to bottom (rows 7 and 8 are the descender), `#` set.
type Glyph = &'static [&'static str];

/// The font: digits, lower case, the capitals charts use, and the punctuation of numbers and
/// legends. Other capitals are drawn as their lower case; anything else as an empty box.
fn glyph(c: char) -> Option<Glyph> {
    Some(match c {
        '0' => &[" ### ", "#   #", "#  ##", "# # #", "##  #", "#   #", " ### "],
        '1' => &["  #  ", " ##  ", "  #  ", "  #  ", "  #  ", "  #  ", " ### "],
        '2' => &[" ### ", "#   #", "    #", "   # ", "  #  ", " #   ", "#####"],
        '3' => &["#####", "   # ", "  #  ", "   # ", "    #", "#   #", " ### "],
        '4' => &["   # ", "  ## ", " # # ", "#  # ", "#####", "   # ", "   # "],
        '5' => &["#####", "#    ", "#### ", "    #", "    #", "#   #", " ### "],
        '6' => &["  ## ", " #   ", "#    ", "#### ", "#   #", "#   #", " ### "],
        '7' => &["#####", "    #", "   # ", "  #  ", " #   ", " #   ", " #   "],
        '8' => &[" ### ", "#   #", "#   #", " ### ", "#   #", "#   #", " ### "],
        '9' => &[" ### ", "#   #", "#   #", " ####", "    #", "   # ", " ##  "],
        'a' => &["     ", "     ", " ### ", "    #", " ####", "#   #", " ####"],
        'b' => &["#    ", "#    ", "# ## ", "##  #", "#   #", "#   #", "#### "],
        'c' => &["     ", "     ", " ### ", "#    ", "#    ", "#   #", " ### "],
        'd' => &["    #", "    #", " ## #", "#  ##", "#   #", "#   #", " ####"],
        'e' => &["     ", "     ", " ### ", "#   #", "#####", "#    ", " ### "],
        'f' => &["  ## ", " #  #", " #   ", "###  ", " #   ", " #   ", " #   "],
        'g' => &["     ", "     ", " ####", "#   #", "#   #", " ####", "    #", "#   #", " ### "],
        'h' => &["#    ", "#    ", "# ## ", "##  #", "#   #", "#   #", "#   #"],
        'i' => &["  #  ", "     ", " ##  ", "  #  ", "  #  ", "  #  ", " ### "],
        'j' => &["   # ", "     ", "  ## ", "   # ", "   # ", "   # ", "   # ", "#  # ", " ##  "],
        'k' => &["#    ", "#    ", "#  # ", "# #  ", "##   ", "# #  ", "#  # "],
        'l' => &[" ##  ", "  #  ", "  #  ", "  #  ", "  #  ", "  #  ", " ### "],
        'm' => &["     ", "     ", "## # ", "# # #", "# # #", "#   #", "#   #"],
        'n' => &["     ", "     ", "# ## ", "##  #", "#   #", "#   #", "#   #"],
        'o' => &["     ", "     ", " ### ", "#   #", "#   #", "#   #", " ### "],
        'p' => &["     ", "     ", "#### ", "#   #", "#   #", "#   #", "#### ", "#    ", "#    "],
        'q' => &["     ", "     ", " ####", "#   #", "#   #", "#   #", " ####", "    #", "    #"],
        'r' => &["     ", "     ", "# ## ", "##  #", "#    ", "#    ", "#    "],
        's' => &["     ", "     ", " ####", "#    ", " ### ", "    #", "#### "],
        't' => &[" #   ", " #   ", "###  ", " #   ", " #   ", " #  #", "  ## "],
        'u' => &["     ", "     ", "#   #", "#   #", "#   #", "#  ##", " ## #"],
        'v' => &["     ", "     ", "#   #", "#   #", "#   #", " # # ", "  #  "],
        'w' => &["     ", "     ", "#   #", "#   #", "# # #", "# # #", " # # "],
        'x' => &["     ", "     ", "#   #", " # # ", "  #  ", " # # ", "#   #"],
        'y' => &["     ", "     ", "#   #", "#   #", "#   #", "#   #", " ####", "    #", " ### "],
        'z' => &["     ", "     ", "#####", "   # ", "  #  ", " #   ", "#####"],
        'K' => &["#   #", "#  # ", "# #  ", "##   ", "# #  ", "#  # ", "#   #"],
        'M' => &["#   #", "## ##", "# # #", "# # #", "#   #", "#   #", "#   #"],
        '(' => &["   # ", "  #  ", " #   ", " #   ", " #   ", "  #  ", "   # "],
        ')' => &[" #   ", "  #  ", "   # ", "   # ", "   # ", "  #  ", " #   "],
        '.' => &["     ", "     ", "     ", "     ", "     ", " ##  ", " ##  "],
        ',' => &["     ", "     ", "     ", "     ", "     ", " ##  ", " ##  ", "  #  ", " #   "],
        '-' => &["     ", "     ", "     ", " ### ", "     ", "     ", "     "],
        '+' => &["     ", "  #  ", "  #  ", "#####", "  #  ", "  #  ", "     "],
        '=' => &["     ", "     ", "#####", "     ", "#####", "     ", "     "],
        ':' => &["     ", " ##  ", " ##  ", "     ", " ##  ", " ##  ", "     "],
        '%' => &["##   ", "##  #", "   # ", "  #  ", " #   ", "#  ##", "   ##"],
        '/' => &["     ", "    #", "   # ", "  #  ", " #   ", "#    ", "     "],
        ' ' => &[],
        c if c.is_ascii_uppercase() => return glyph(c.to_ascii_lowercase()),
        _ => return None,
    })
}

/// Pixels a character advances at scale 1 (5 wide, 1 apart).
const ADVANCE: u32 = 6;

/// A canvas with the drawing the charts need.
struct Canvas {
    img: RgbImage,
}

impl Canvas {
    fn new(w: u32, h: u32) -> Self {
        Canvas { img: RgbImage::from_pixel(w, h, Rgb([255, 255, 255])) }
    }

    fn put(&mut self, x: i64, y: i64, c: Rgb<u8>) {
        if x >= 0 && y >= 0 && (x as u32) < self.img.width() && (y as u32) < self.img.height() {
            self.img.put_pixel(x as u32, y as u32, c);
        }
    }

    /// A line `width` pixels thick from (x0, y0) to (x1, y1).
    fn line(&mut self, (x0, y0): (f64, f64), (x1, y1): (f64, f64), width: u32, c: Rgb<u8>) {
        let steps = ((x1 - x0).abs().max((y1 - y0).abs()) * 2.0).ceil().max(1.0) as usize;
        let (lo, hi) = (-((width as i64 - 1) / 2), width as i64 / 2);
        for i in 0..=steps {
            let f = i as f64 / steps as f64;
            let (x, y) = ((x0 + (x1 - x0) * f).round() as i64, (y0 + (y1 - y0) * f).round() as i64);
            for dx in lo..=hi {
                for dy in lo..=hi {
                    self.put(x + dx, y + dy, c);
                }
            }
        }
    }

    /// `text` with its top-left at (x, y), each font pixel `scale`² pixels; `vertical` turns it
    /// a quarter to the left (read bottom to top), (x, y) then its bottom-left.
    fn text(&mut self, text: &str, (x, y): (f64, f64), scale: u32, vertical: bool, c: Rgb<u8>) {
        let (x, y, s) = (x.round() as i64, y.round() as i64, scale as i64);
        for (k, ch) in text.chars().enumerate() {
            let base = k as i64 * ADVANCE as i64;
            let rows: Vec<Vec<bool>> = match glyph(ch) {
                Some(g) => g.iter().map(|r| r.chars().map(|p| p == '#').collect()).collect(),
                // An empty box where the font has no glyph.
                None => (0..7).map(|r| (0..5).map(|q| r == 0 || r == 6 || q == 0 || q == 4).collect()).collect(),
            };
            for (gy, row) in rows.iter().enumerate() {
                for (gx, on) in row.iter().enumerate() {
                    if !on {
                        continue;
                    }
                    let (u, v) = (base + gx as i64, gy as i64);
                    for a in 0..s {
                        for b in 0..s {
                            let (px, py) =
                                if vertical { (x + v * s + b, y - u * s - a) } else { (x + u * s + a, y + v * s + b) };
                            self.put(px, py, c);
                        }
                    }
                }
            }
        }
    }

    fn png(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.img
            .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
            .expect("PNG encoding to memory");
        out
    }
}

/// Pixels `text` spans at `scale`.
fn text_width(text: &str, scale: u32) -> f64 {
    (text.chars().count() as u32 * ADVANCE * scale) as f64
}

fn rgb(hex: &str) -> Rgb<u8> {
    let v = u32::from_str_radix(hex.trim_start_matches('#'), 16).expect("a #rrggbb colour");
    Rgb([(v >> 16) as u8, (v >> 8) as u8, v as u8])
}

/// Where a chart's plot area lies on its canvas, and its ranges: maps data to pixels.
pub struct Frame {
    pub left: f64,
    pub top: f64,
    pub right: f64,
    pub bottom: f64,
    pub x: (f64, f64),
    pub y: (f64, f64),
}

impl Frame {
    pub fn px(&self, (a, b): (f64, f64)) -> (f64, f64) {
        let fx = (a - self.x.0) / (self.x.1 - self.x.0).max(1e-12);
        let fy = (b - self.y.0) / (self.y.1 - self.y.0).max(1e-12);
        (self.left + fx * (self.right - self.left), self.bottom - fy * (self.bottom - self.top))
    }
}

/// The size of a [`line_chart`] above its legend, and its plot area over the ranges `x` and `y`.
pub fn frame(x: (f64, f64), y: (f64, f64)) -> (u32, u32, Frame) {
    (720, 600, Frame { left: 96.0, top: 52.0, right: 696.0, bottom: 520.0, x, y })
}

/// A line chart as PNG: what [`crate::report::line_chart`] draws as SVG (title, grid and ticks
/// over the `x` and `y` ranges, axis names, one coloured line per series, the legend under the
/// plot, one entry a row), at 720 pixels wide. Colours are the page's, in the same order.
pub fn line_chart(
    title: &str,
    axes: (&str, &str),
    x: (f64, f64),
    y: (f64, f64),
    series: &[crate::report::Series],
) -> Vec<u8> {
    let (w, h, f) = frame(x, y);
    let legend_row = 28.0;
    let mut c = Canvas::new(w, h + (legend_row as u32) * series.len() as u32 + 8);
    let (ink, grid, edge) = (rgb("#222222"), rgb("#e6e6e6"), rgb("#888888"));
    c.text(title, (w as f64 / 2.0 - text_width(title, 2) / 2.0, 14.0), 2, false, ink);
    for i in 0..=5 {
        let (vx, vy) = (x.0 + (x.1 - x.0) * i as f64 / 5.0, y.0 + (y.1 - y.0) * i as f64 / 5.0);
        let (gx, _) = f.px((vx, y.0));
        let (_, gy) = f.px((x.0, vy));
        c.line((gx, f.top), (gx, f.bottom), 1, grid);
        c.line((f.left, gy), (f.right, gy), 1, grid);
        let (lx, ly) = (crate::report::tick(vx), crate::report::tick(vy));
        c.text(&lx, (gx - text_width(&lx, 2) / 2.0, f.bottom + 8.0), 2, false, ink);
        c.text(&ly, (f.left - 8.0 - text_width(&ly, 2), gy - 7.0), 2, false, ink);
    }
    // The frame: its four corners joined in turn.
    let corners = [(f.left, f.top), (f.right, f.top), (f.right, f.bottom), (f.left, f.bottom)];
    for k in 0..4 {
        c.line(corners[k], corners[(k + 1) % 4], 1, edge);
    }
    c.text(axes.0, ((f.left + f.right) / 2.0 - text_width(axes.0, 2) / 2.0, f.bottom + 38.0), 2, false, ink);
    c.text(axes.1, (14.0, (f.top + f.bottom) / 2.0 + text_width(axes.1, 2) / 2.0), 2, true, ink);
    for (i, se) in series.iter().enumerate() {
        let colour = rgb(crate::report::COLOURS[i % crate::report::COLOURS.len()]);
        for p in se.points.windows(2) {
            c.line(f.px(p[0]), f.px(p[1]), 3, colour);
        }
        let ly = h as f64 + legend_row * i as f64;
        c.line((f.left, ly + 7.0), (f.left + 28.0, ly + 7.0), 3, colour);
        c.text(&se.name, (f.left + 38.0, ly), 2, false, ink);
    }
    c.png()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::Series;

    #[test]
    fn the_font_draws_every_character_a_chart_writes() {
        let texts = [
            "Kaplan-Meier by risk group (log-rank p = 1.23e-04)",
            "high risk (120 slides, 45 events) low risk time survival days months",
            "0123456789 .,-+=:%/ abcdefghijklmnopqrstuvwxyz",
        ];
        for t in texts {
            let missing: Vec<char> = t.chars().filter(|&c| glyph(c).is_none()).collect();
            assert!(missing.is_empty(), "no glyph for {missing:?}");
        }
        assert!(glyph('§').is_none(), "an unknown character has no glyph (drawn as a box)");
        for c in ('!'..='~').filter_map(glyph) {
            assert!(c.len() <= 9 && c.iter().all(|r| r.chars().count() == 5), "{c:?}");
        }
        assert_eq!(glyph('T'), glyph('t'), "other capitals as their lower case");
    }

    /// Where the pixels of `colour` lie in column `x`, top to bottom.
    fn rows_of(img: &RgbImage, x: u32, colour: Rgb<u8>) -> Vec<u32> {
        (0..img.height()).filter(|&y| *img.get_pixel(x, y) == colour).collect()
    }

    #[test]
    fn each_curve_is_drawn_where_its_values_fall_in_its_own_colour_with_the_text() {
        let steps = |drop_at: f64, to: f64| vec![(0.0, 1.0), (drop_at, 1.0), (drop_at, to), (100.0, to)];
        let series = [
            Series {
                name: "high risk (10 slides, 6 events)".into(),
                points: steps(30.0, 0.2),
                bold: false,
                dots: false,
            },
            Series {
                name: "low risk (10 slides, 2 events)".into(),
                points: steps(60.0, 0.7),
                bold: false,
                dots: false,
            },
        ];
        let png = line_chart("Kaplan-Meier", ("time", "survival"), (0.0, 100.0), (0.0, 1.0), &series);
        let img = image::load_from_memory(&png).unwrap().to_rgb8();
        let (w, h, f) = frame((0.0, 100.0), (0.0, 1.0));
        assert_eq!((img.width(), img.height()), (w, h + 2 * 28 + 8));
        let [high, low] = [0, 1].map(|i| rgb(crate::report::COLOURS[i]));
        // Before its drop, after it: each curve's pixels in a column sit on its value (3 px thick).
        for (t, colour, want) in [(45.0, high, 0.2), (80.0, high, 0.2), (45.0, low, 1.0), (80.0, low, 0.7)] {
            let (x, y) = f.px((t, want));
            let rows = rows_of(&img, x as u32, colour);
            assert!(!rows.is_empty() && rows.iter().all(|&r| (r as f64 - y).abs() <= 1.5), "t {t}: {rows:?} vs {y}");
        }
        // The drop is a vertical run from 1 (where the low-risk line, drawn after it, covers its
        // top) to its value at its time.
        let (x, top) = f.px((30.0, 1.0));
        let rows = rows_of(&img, x as u32, high);
        let (_, bottom) = f.px((30.0, 0.2));
        assert!(rows.first().is_some_and(|&r| (r as f64 - top).abs() <= 3.0), "{rows:?}");
        assert!(rows.last().is_some_and(|&r| (r as f64 - bottom).abs() <= 1.5), "{rows:?}");
        // Neither colour strays outside the plot area but in the legend's swatches.
        for (x, y, p) in img.enumerate_pixels() {
            if *p == high || *p == low {
                let inside = (x as f64) >= f.left - 2.0 && (x as f64) <= f.right + 2.0 && (y as f64) >= f.top - 2.0;
                assert!(inside, "({x}, {y})");
            }
        }
        let ink = |p: &Rgb<u8>| p.0.iter().all(|&v| v < 80);
        // Text is ink: the title's band and the legend's rows hold dark pixels, the right margin
        // beside an empty legend row none.
        let dark = |x0: u32, y0: u32, x1: u32, y1: u32| {
            (x0..x1).flat_map(|x| (y0..y1).map(move |y| (x, y))).filter(|&(x, y)| ink(img.get_pixel(x, y))).count()
        };
        assert!(dark(0, 10, w, 34) > 100, "the title");
        assert!(dark(f.left as u32 + 38, h, w, h + 20) > 100, "the first legend entry");
        assert!(dark(600, h, w, h + 60) == 0, "nothing past the legend's text");
        let untitled = line_chart("", ("time", "survival"), (0.0, 100.0), (0.0, 1.0), &series);
        let untitled = image::load_from_memory(&untitled).unwrap().to_rgb8();
        assert_eq!(
            (0..w).flat_map(|x| (10..34).map(move |y| (x, y))).filter(|&(x, y)| ink(untitled.get_pixel(x, y))).count(),
            0
        );
    }
}
