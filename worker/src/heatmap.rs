//! Attention heatmaps: each patch's attention, turned into a percentile (as CLAM does, so one
//! outlier does not wash out the map), coloured and blended over the slide's thumbnail.

use image::{Rgb, RgbImage};

/// A perceptually ordered blue → cyan → yellow → red ramp for t in [0, 1].
pub fn colour(t: f32) -> [u8; 3] {
    let stops: [(f32, [f32; 3]); 5] = [
        (0.0, [48.0, 18.0, 160.0]),
        (0.35, [30.0, 150.0, 230.0]),
        (0.6, [120.0, 220.0, 90.0]),
        (0.8, [250.0, 200.0, 40.0]),
        (1.0, [220.0, 30.0, 30.0]),
    ];
    let t = t.clamp(0.0, 1.0);
    for w in stops.windows(2) {
        let ((t0, c0), (t1, c1)) = (w[0], w[1]);
        if t <= t1 {
            let f = (t - t0) / (t1 - t0);
            return [0, 1, 2].map(|i| (c0[i] + f * (c1[i] - c0[i])).round() as u8);
        }
    }
    [220, 30, 30]
}

/// Percentile rank of each score in [0, 1] (ties share the mean rank).
pub fn percentiles(scores: &[f32]) -> Vec<f32> {
    let n = scores.len();
    if n <= 1 {
        return vec![1.0; n];
    }
    let mut idx: Vec<usize> = (0..n).collect();
    idx.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let mut out = vec![0f32; n];
    let mut i = 0;
    while i < n {
        let mut j = i;
        while j + 1 < n && scores[idx[j + 1]] == scores[idx[i]] {
            j += 1;
        }
        let r = (i + j) as f32 / 2.0 / (n - 1) as f32;
        for k in i..=j {
            out[idx[k]] = r;
        }
        i = j + 1;
    }
    out
}

/// Draw each patch (level-0 top-left `xs, ys`, side `patch_level0`) over `thumb`, whose downsample
/// from level 0 is `level0_width / thumb.width()`.
pub fn render(
    thumb: &RgbImage,
    level0_width: u64,
    xs: &[i64],
    ys: &[i64],
    patch_level0: u64,
    scores: &[f32],
) -> RgbImage {
    let mut out = thumb.clone();
    let ds = level0_width as f64 / thumb.width() as f64;
    let pct = percentiles(scores);
    let alpha = 0.5f32;
    for ((x, y), p) in xs.iter().zip(ys).zip(pct) {
        let c = colour(p);
        let x0 = (*x as f64 / ds).floor() as u32;
        let y0 = (*y as f64 / ds).floor() as u32;
        let x1 = (((*x as u64 + patch_level0) as f64 / ds).ceil() as u32).min(out.width());
        let y1 = (((*y as u64 + patch_level0) as f64 / ds).ceil() as u32).min(out.height());
        for yy in y0..y1 {
            for xx in x0..x1 {
                let Rgb(px) = *out.get_pixel(xx, yy);
                let blended = [0, 1, 2].map(|i| ((1.0 - alpha) * px[i] as f32 + alpha * c[i] as f32).round() as u8);
                out.put_pixel(xx, yy, Rgb(blended));
            }
        }
    }
    with_legend(&out)
}

/// 3×5 glyphs for the legend's labels (a bit per pixel, rows top to bottom, 3 bits each).
fn glyph(c: char) -> [u8; 5] {
    match c {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '5' => [7, 4, 7, 1, 7],
        '%' => [5, 1, 2, 4, 5],
        _ => [0; 5],
    }
}

/// `text` at (x, y), each glyph pixel a `scale`-sided square.
fn draw_text(img: &mut RgbImage, x: u32, y: u32, text: &str, scale: u32) {
    for (k, c) in text.chars().enumerate() {
        let g = glyph(c);
        for (row, bits) in g.iter().enumerate() {
            for col in 0..3u32 {
                if bits >> (2 - col) & 1 == 1 {
                    for dy in 0..scale {
                        for dx in 0..scale {
                            let (px, py) = (x + (k as u32 * 4 + col) * scale + dx, y + row as u32 * scale + dy);
                            if px < img.width() && py < img.height() {
                                img.put_pixel(px, py, Rgb([20, 20, 20]));
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The heatmap with its legend to the right: the colour ramp from the lowest attention (0th
/// percentile, bottom) to the highest (100th, top), labelled.
pub fn with_legend(map: &RgbImage) -> RgbImage {
    let (w, h) = map.dimensions();
    if h == 0 {
        return map.clone();
    }
    let scale = (h / 160).clamp(1, 4);
    let bar = 6 * scale;
    let strip = bar + 4 * scale + 16 * scale;
    let mut out = RgbImage::from_pixel(w + strip, h, Rgb([255, 255, 255]));
    image::imageops::replace(&mut out, map, 0, 0);
    let margin = (4 * scale).min(h / 4);
    let (top, bottom) = (margin, h.saturating_sub(margin).max(margin + 1));
    let x0 = w + 2 * scale;
    for y in top..bottom {
        let t = 1.0 - (y - top) as f32 / (bottom - 1 - top).max(1) as f32;
        let c = colour(t);
        for x in x0..x0 + bar {
            out.put_pixel(x, y, Rgb(c));
        }
    }
    let label_x = x0 + bar + 2 * scale;
    let mid = (top + bottom) / 2;
    draw_text(&mut out, label_x, top, "100%", scale);
    draw_text(&mut out, label_x, mid.saturating_sub(2 * scale), "50%", scale);
    draw_text(&mut out, label_x, bottom.saturating_sub(5 * scale), "0%", scale);
    out
}

/// The patches as a GeoJSON FeatureCollection that QuPath imports (File › Import objects): each a
/// `tile` object, a square in level-0 pixels, with its attention, attention percentile and (where
/// given) the instance path's probability as measurements.
pub fn geojson(xs: &[i64], ys: &[i64], patch_level0: u64, attention: &[f32], instance: Option<&[f32]>) -> Vec<u8> {
    let pct = percentiles(attention);
    let s = patch_level0 as i64;
    let features: Vec<serde_json::Value> = xs
        .iter()
        .zip(ys)
        .enumerate()
        .map(|(i, (&x, &y))| {
            let mut m = serde_json::Map::new();
            m.insert("attention".into(), serde_json::json!(attention[i]));
            m.insert("attention percentile".into(), serde_json::json!(pct[i]));
            if let Some(p) = instance {
                m.insert("instance probability".into(), serde_json::json!(p[i]));
            }
            serde_json::json!({
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [[[x, y], [x + s, y], [x + s, y + s], [x, y + s], [x, y]]]},
                "properties": {"objectType": "tile", "name": format!("patch {i}"), "measurements": m},
            })
        })
        .collect();
    serde_json::to_vec(&serde_json::json!({"type": "FeatureCollection", "features": features})).expect("json")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_rank_scores() {
        assert_eq!(percentiles(&[0.3, 0.1, 0.2]), vec![1.0, 0.0, 0.5]);
        assert_eq!(percentiles(&[0.5, 0.5]), vec![0.5, 0.5]);
    }

    #[test]
    fn hot_patches_are_red_and_untouched_areas_keep_the_thumbnail() {
        let thumb = RgbImage::from_pixel(20, 10, Rgb([255, 255, 255]));
        // Level 0 is 200 px wide: downsample 10; two 50-px patches.
        let img = render(&thumb, 200, &[0, 100], &[0, 0], 50, &[0.1, 0.9]);
        let hot = img.get_pixel(12, 2).0;
        let cold = img.get_pixel(2, 2).0;
        assert!(hot[0] > hot[2], "hot patch is red: {hot:?}");
        assert!(cold[2] > cold[0], "cold patch is blue: {cold:?}");
        assert_eq!(img.get_pixel(19, 9).0, [255, 255, 255]);
        // The legend to the right: the ramp's top is the hottest colour, its bottom the coldest.
        assert!(img.width() > 20);
        let col = (20..img.width()).find(|&x| img.get_pixel(x, 5).0 != [255, 255, 255]).expect("a legend");
        let rows: Vec<u32> = (0..10).filter(|&y| img.get_pixel(col, y).0 != [255, 255, 255]).collect();
        let (top, bottom) = (img.get_pixel(col, rows[0]).0, img.get_pixel(col, *rows.last().unwrap()).0);
        assert!(top[0] > top[2] && bottom[2] > bottom[0], "hot {top:?} above cold {bottom:?}");
        // Nothing to draw a legend on: the map as it is.
        assert_eq!(with_legend(&RgbImage::new(5, 0)).dimensions(), (5, 0));
    }

    #[test]
    fn the_legend_ramps_from_cold_at_the_bottom_to_hot_at_the_top_with_labels() {
        let map = RgbImage::from_pixel(300, 320, Rgb([255, 255, 255]));
        let img = with_legend(&map);
        let bar_x = (300..img.width()).find(|&x| img.get_pixel(x, 160).0 != [255, 255, 255]).unwrap();
        let top = img.get_pixel(bar_x, 10).0;
        let bottom = img.get_pixel(bar_x, 309).0;
        assert!(top[0] > top[2] && bottom[2] > bottom[0], "hot {top:?} on top, cold {bottom:?} below");
        let dark = img.pixels().filter(|p| p.0 == [20, 20, 20]).count();
        assert!(dark > 30, "labels drawn: {dark} pixels");
    }

    #[test]
    fn the_qupath_export_is_a_tile_per_patch_with_its_measurements() {
        let bytes = geojson(&[0, 512], &[256, 256], 512, &[0.2, 0.8], Some(&[0.1, 0.95]));
        let doc: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(doc["type"], "FeatureCollection");
        let f = &doc["features"][1];
        assert_eq!(f["properties"]["objectType"], "tile");
        assert_eq!(f["geometry"]["coordinates"][0][2], serde_json::json!([1024, 768]));
        let m = &f["properties"]["measurements"];
        assert!((m["attention"].as_f64().unwrap() - 0.8).abs() < 1e-6);
        assert_eq!(m["attention percentile"], 1.0);
        assert!((m["instance probability"].as_f64().unwrap() - 0.95).abs() < 1e-6);
        // Round trip through the truth reader: the tiles are polygons it fills.
        let t = wsimil_common::truth::Truth::from_bytes("t.geojson", &bytes, (2048, 2048)).unwrap();
        assert_eq!(t.coverage(&[512], &[256], 512), vec![1.0]);
    }
}
