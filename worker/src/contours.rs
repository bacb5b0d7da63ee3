//! Tissue contours as polygons, and as GeoJSON that QuPath imports (File → Import objects).
//!
//! Boundaries are traced along pixel edges ("crack following"): every edge between a tissue pixel
//! and a non-tissue one is a directed segment with the tissue on its right, so outer boundaries run
//! clockwise (y down) and holes anticlockwise; where two tissue pixels touch only at a corner the
//! trace turns left, joining them, as the 8-connected regions of tissue detection do. A polygon's
//! area, outer ring minus holes, is exactly its region's pixel count.

use image::GrayImage;
use serde_json::json;

/// Directions of travel: right, down, left, up (y grows downwards).
const STEP: [(i64, i64); 4] = [(1, 0), (0, 1), (-1, 0), (0, -1)];

/// One region: its outer ring, then its holes; vertices in mask pixels, rings not repeated-closed.
#[derive(Debug, Clone, PartialEq)]
pub struct Polygon {
    pub outer: Vec<(i64, i64)>,
    pub holes: Vec<Vec<(i64, i64)>>,
}

/// Twice the signed area (positive for clockwise rings, y down).
fn twice_area(ring: &[(i64, i64)]) -> i64 {
    ring.iter().zip(ring.iter().cycle().skip(1)).map(|(a, b)| a.0 * b.1 - b.0 * a.1).sum()
}

impl Polygon {
    /// Area in mask pixels: outer minus holes.
    pub fn area(&self) -> i64 {
        (twice_area(&self.outer) + self.holes.iter().map(|h| twice_area(h)).sum::<i64>()) / 2
    }
}

/// Trace every tissue region of `mask` (pixels > 0).
pub fn trace(mask: &GrayImage) -> Vec<Polygon> {
    let (w, h) = (mask.width() as i64, mask.height() as i64);
    let on = |x: i64, y: i64| x >= 0 && y >= 0 && x < w && y < h && mask.as_raw()[(y * w + x) as usize] > 0;
    let vw = (w + 1) as usize;
    // out[v]: bit d set when an edge leaves vertex v in direction d.
    let mut out = vec![0u8; vw * (h + 1) as usize];
    let v = |x: i64, y: i64| y as usize * vw + x as usize;
    for y in 0..h {
        for x in 0..w {
            if !on(x, y) {
                continue;
            }
            if !on(x, y - 1) {
                out[v(x, y)] |= 1 << 0; // top side, going right
            }
            if !on(x + 1, y) {
                out[v(x + 1, y)] |= 1 << 1; // right side, going down
            }
            if !on(x, y + 1) {
                out[v(x + 1, y + 1)] |= 1 << 2; // bottom side, going left
            }
            if !on(x - 1, y) {
                out[v(x, y + 1)] |= 1 << 3; // left side, going up
            }
        }
    }
    // Region labels (8-connected), to give each ring to its region.
    let labels = label8(mask);
    let mut regions: std::collections::BTreeMap<u32, Polygon> = Default::default();
    // Start at vertices with a single outgoing edge (never a saddle), then anything left.
    for pass in 0..2 {
        for start in 0..out.len() {
            while out[start] != 0 && (pass == 1 || out[start].count_ones() == 1) {
                let (sx, sy) = ((start % vw) as i64, (start / vw) as i64);
                let first = out[start].trailing_zeros() as usize;
                // The tissue pixel on the right of the first edge names the region.
                let pixel = match first {
                    0 => (sx, sy),
                    1 => (sx - 1, sy),
                    2 => (sx - 1, sy - 1),
                    _ => (sx, sy - 1),
                };
                let label = labels[(pixel.1 * w + pixel.0) as usize];
                let mut ring = Vec::new();
                let (mut x, mut y, mut d) = (sx, sy, first);
                loop {
                    out[v(x, y)] &= !(1 << d);
                    ring.push((x, y));
                    x += STEP[d].0;
                    y += STEP[d].1;
                    let here = out[v(x, y)];
                    if here == 0 {
                        break; // back at the start: the ring is closed
                    }
                    // Prefer a left turn (joins diagonal neighbours), then straight, then right.
                    d = [(d + 3) % 4, d, (d + 1) % 4].into_iter().find(|nd| here & (1 << nd) != 0).unwrap_or(d);
                }
                let ring = simplify(ring);
                let poly = regions.entry(label).or_insert(Polygon { outer: Vec::new(), holes: Vec::new() });
                if twice_area(&ring) > 0 {
                    poly.outer = ring;
                } else {
                    poly.holes.push(ring);
                }
            }
        }
    }
    regions.into_values().filter(|p| !p.outer.is_empty()).collect()
}

/// Drop vertices in the middle of straight runs.
fn simplify(ring: Vec<(i64, i64)>) -> Vec<(i64, i64)> {
    let n = ring.len();
    (0..n)
        .filter(|&i| {
            let (p, c, q) = (ring[(i + n - 1) % n], ring[i], ring[(i + 1) % n]);
            (c.0 - p.0) * (q.1 - c.1) != (c.1 - p.1) * (q.0 - c.0)
        })
        .map(|i| ring[i])
        .collect()
}

/// 8-connected labels of pixels > 0 (0 = background).
fn label8(mask: &GrayImage) -> Vec<u32> {
    crate::tissue::components(mask, |v| v > 0, true).0
}

/// A GeoJSON FeatureCollection of the tissue regions in level-0 pixels (mask vertex ×
/// `downsample`), as QuPath annotations classified "Tissue".
pub fn geojson(polygons: &[Polygon], downsample: f64) -> serde_json::Value {
    let ring = |r: &[(i64, i64)]| -> Vec<[f64; 2]> {
        let mut pts: Vec<[f64; 2]> = r.iter().map(|(x, y)| [*x as f64 * downsample, *y as f64 * downsample]).collect();
        if let Some(first) = pts.first().copied() {
            pts.push(first); // GeoJSON rings repeat their first point
        }
        pts
    };
    let features: Vec<serde_json::Value> = polygons
        .iter()
        .map(|p| {
            let mut rings = vec![ring(&p.outer)];
            rings.extend(p.holes.iter().map(|h| ring(h)));
            json!({
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": rings},
                "properties": {
                    "objectType": "annotation",
                    "classification": {"name": "Tissue", "color": [0, 160, 80]},
                    "area_level0_px": p.area() as f64 * downsample * downsample,
                },
            })
        })
        .collect();
    json!({"type": "FeatureCollection", "features": features})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mask(w: u32, h: u32, f: impl Fn(u32, u32) -> bool) -> GrayImage {
        GrayImage::from_fn(w, h, |x, y| image::Luma([if f(x, y) { 255 } else { 0 }]))
    }

    #[test]
    fn a_square_is_one_clockwise_ring_of_four_corners() {
        let m = mask(6, 6, |x, y| (1..4).contains(&x) && (2..5).contains(&y));
        let p = trace(&m);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].outer, vec![(1, 2), (4, 2), (4, 5), (1, 5)]);
        assert!(p[0].holes.is_empty());
        assert_eq!(p[0].area(), 9);
    }

    #[test]
    fn areas_match_pixel_counts_with_holes_and_separate_regions() {
        // A disc with a square hole, a separate blob, and a diagonal pair (8-connected: one region).
        let m = mask(60, 40, |x, y| {
            let (dx, dy) = (x as f64 - 20.0, y as f64 - 20.0);
            let disc = dx * dx + dy * dy < 15.0 * 15.0 && !((17..23).contains(&x) && (17..23).contains(&y));
            let blob = (45..55).contains(&x) && (5..12).contains(&y);
            let diag = (x, y) == (50, 30) || (x, y) == (51, 31);
            disc || blob || diag
        });
        let polys = trace(&m);
        assert_eq!(polys.len(), 3, "{polys:?}");
        let labels = label8(&m);
        for p in &polys {
            // The region containing the outer ring's first pixel.
            let (x, y) = p.outer[0];
            let l = labels[(y * 60 + x) as usize];
            let pixels = labels.iter().filter(|v| **v == l).count() as i64;
            assert_eq!(p.area(), pixels);
        }
        let holed = polys.iter().find(|p| !p.holes.is_empty()).expect("the disc has its hole");
        assert_eq!(holed.holes.len(), 1);
        assert_eq!(-twice_area(&holed.holes[0]) / 2, 36);
        let total: i64 = polys.iter().map(|p| p.area()).sum();
        assert_eq!(total, m.pixels().filter(|p| p.0[0] > 0).count() as i64);
    }

    #[test]
    fn geojson_rings_are_closed_and_scaled_to_level0() {
        let m = mask(4, 4, |x, y| x < 2 && y < 2);
        let g = geojson(&trace(&m), 16.0);
        let ring = &g["features"][0]["geometry"]["coordinates"][0];
        assert_eq!(ring.as_array().unwrap().len(), 5);
        assert_eq!(ring[0], ring[4]);
        assert_eq!(ring[2], json!([32.0, 32.0]));
        assert_eq!(g["features"][0]["properties"]["objectType"], "annotation");
        assert_eq!(g["features"][0]["properties"]["area_level0_px"], 4.0 * 256.0);
    }
}
