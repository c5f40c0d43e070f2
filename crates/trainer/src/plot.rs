//! Line charts written as PNG with no plotting dependency: a small raster,
//! a 3x5 pixel font for titles and axis numbers, and a PNG encoder using
//! stored (uncompressed) deflate blocks. Good enough to watch a run.

use std::path::Path;

use crate::error::{io_err, Result};

const W: usize = 640;
const H: usize = 400;
const LEFT: usize = 70;
const RIGHT: usize = 20;
const TOP: usize = 40;
const BOTTOM: usize = 40;

/// Line colours, in series order.
pub const COLORS: [[u8; 3]; 4] = [[31, 119, 180], [214, 39, 40], [44, 160, 44], [255, 127, 14]];

fn glyph(c: char) -> [u8; 5] {
    match c.to_ascii_uppercase() {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 7, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 1, 1],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        'A' => [2, 5, 7, 5, 5],
        'B' => [6, 5, 6, 5, 6],
        'C' => [3, 4, 4, 4, 3],
        'D' => [6, 5, 5, 5, 6],
        'E' => [7, 4, 6, 4, 7],
        'F' => [7, 4, 6, 4, 4],
        'G' => [3, 4, 5, 5, 3],
        'H' => [5, 5, 7, 5, 5],
        'I' => [7, 2, 2, 2, 7],
        'J' => [1, 1, 1, 5, 2],
        'K' => [5, 5, 6, 5, 5],
        'L' => [4, 4, 4, 4, 7],
        'M' => [5, 7, 7, 5, 5],
        'N' => [6, 5, 5, 5, 5],
        'O' => [2, 5, 5, 5, 2],
        'P' => [6, 5, 6, 4, 4],
        'Q' => [2, 5, 5, 6, 3],
        'R' => [6, 5, 6, 5, 5],
        'S' => [3, 4, 2, 1, 6],
        'T' => [7, 2, 2, 2, 2],
        'U' => [5, 5, 5, 5, 7],
        'V' => [5, 5, 5, 5, 2],
        'W' => [5, 5, 7, 7, 5],
        'X' => [5, 5, 2, 5, 5],
        'Y' => [5, 5, 2, 2, 2],
        'Z' => [7, 1, 2, 4, 7],
        '.' => [0, 0, 0, 0, 2],
        '-' => [0, 0, 7, 0, 0],
        '/' => [1, 1, 2, 4, 4],
        ':' => [0, 2, 0, 2, 0],
        '_' => [0, 0, 0, 0, 7],
        '(' => [2, 4, 4, 4, 2],
        ')' => [2, 1, 1, 1, 2],
        '=' => [0, 7, 0, 7, 0],
        _ => [0, 0, 0, 0, 0],
    }
}

struct Canvas {
    px: Vec<u8>,
}

impl Canvas {
    fn new() -> Canvas {
        Canvas {
            px: vec![255; W * H * 3],
        }
    }
    fn set(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < W && (y as usize) < H {
            let i = (y as usize * W + x as usize) * 3;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }
    fn line(&mut self, (x0, y0): (f64, f64), (x1, y1): (f64, f64), c: [u8; 3], thick: i64) {
        let steps = ((x1 - x0).abs().max((y1 - y0).abs()) as usize).max(1);
        for s in 0..=steps {
            let t = s as f64 / steps as f64;
            let (x, y) = ((x0 + (x1 - x0) * t).round() as i64, (y0 + (y1 - y0) * t).round() as i64);
            for dx in 0..thick {
                for dy in 0..thick {
                    self.set(x + dx, y + dy, c);
                }
            }
        }
    }
    fn text(&mut self, x: usize, y: usize, s: &str, scale: usize, c: [u8; 3]) {
        for (k, ch) in s.chars().enumerate() {
            let g = glyph(ch);
            for (row, bits) in g.iter().enumerate() {
                for col in 0..3 {
                    if bits & (4 >> col) != 0 {
                        for a in 0..scale {
                            for b in 0..scale {
                                self.set(
                                    (x + k * 4 * scale + col * scale + a) as i64,
                                    (y + row * scale + b) as i64,
                                    c,
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

fn fmt_num(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// Draws `series` (name, points (x, y)) as lines under `title` and writes a PNG.
pub fn line_chart(path: &Path, title: &str, series: &[(&str, Vec<(f64, f64)>)]) -> Result<()> {
    let mut cv = Canvas::new();
    let pts: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.1.iter().copied())
        .filter(|p| p.0.is_finite() && p.1.is_finite())
        .collect();
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in &pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if pts.is_empty() {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    if y1 <= y0 {
        y1 = y0 + 1.0;
    }
    let pad = (y1 - y0) * 0.05;
    let (y0, y1) = (y0 - pad, y1 + pad);
    let (pw, ph) = ((W - LEFT - RIGHT) as f64, (H - TOP - BOTTOM) as f64);
    let map = |x: f64, y: f64| {
        (
            LEFT as f64 + (x - x0) / (x1 - x0) * pw,
            TOP as f64 + (1.0 - (y - y0) / (y1 - y0)) * ph,
        )
    };
    let grey = [120, 120, 120];
    // Axes and grid.
    for i in 0..=4 {
        let y = TOP as f64 + ph * i as f64 / 4.0;
        cv.line((LEFT as f64, y), (LEFT as f64 + pw, y), [225, 225, 225], 1);
        let v = y1 - (y1 - y0) * i as f64 / 4.0;
        cv.text(4, y as usize - 4, &fmt_num(v), 2, grey);
    }
    cv.line((LEFT as f64, TOP as f64), (LEFT as f64, TOP as f64 + ph), grey, 1);
    cv.line(
        (LEFT as f64, TOP as f64 + ph),
        (LEFT as f64 + pw, TOP as f64 + ph),
        grey,
        1,
    );
    cv.text(LEFT, H - BOTTOM + 10, &fmt_num(x0), 2, grey);
    let xr = fmt_num(x1);
    cv.text(W - RIGHT - xr.len() * 8, H - BOTTOM + 10, &xr, 2, grey);
    cv.text(LEFT + (pw as usize) / 2 - 16, H - BOTTOM + 10, "STEP", 2, grey);
    cv.text(LEFT, 10, title, 3, [0, 0, 0]);
    // Series and legend.
    for (k, (name, s)) in series.iter().enumerate() {
        let c = COLORS[k % COLORS.len()];
        let mut prev: Option<(f64, f64)> = None;
        for &(x, y) in s.iter().filter(|p| p.0.is_finite() && p.1.is_finite()) {
            let q = map(x, y);
            if let Some(p) = prev {
                cv.line(p, q, c, 2);
            } else {
                cv.line(q, q, c, 3);
            }
            prev = Some(q);
        }
        let ly = TOP + 8 + k * 16;
        cv.line(
            ((W - 200) as f64, (ly + 4) as f64),
            ((W - 180) as f64, (ly + 4) as f64),
            c,
            3,
        );
        cv.text(W - 174, ly, name, 2, [40, 40, 40]);
    }
    write_png(path, &cv.px, W, H)
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let mut c = kind.to_vec();
    c.extend_from_slice(data);
    out.extend_from_slice(&c);
    out.extend_from_slice(&crc32(&c).to_be_bytes());
}

/// Writes an RGB8 image as PNG (zlib stream of stored deflate blocks).
pub fn write_png(path: &Path, rgb: &[u8], w: usize, h: usize) -> Result<()> {
    let mut raw = Vec::with_capacity((w * 3 + 1) * h);
    for row in rgb.chunks(w * 3) {
        raw.push(0);
        raw.extend_from_slice(row);
    }
    let mut z = vec![0x78, 0x01];
    let blocks: Vec<&[u8]> = raw.chunks(65_535).collect();
    for (i, b) in blocks.iter().enumerate() {
        z.push(if i + 1 == blocks.len() { 1 } else { 0 });
        z.extend_from_slice(&(b.len() as u16).to_le_bytes());
        z.extend_from_slice(&(!(b.len() as u16)).to_le_bytes());
        z.extend_from_slice(b);
    }
    let (mut a, mut bsum) = (1u32, 0u32);
    for &x in &raw {
        a = (a + x as u32) % 65_521;
        bsum = (bsum + a) % 65_521;
    }
    z.extend_from_slice(&((bsum << 16) | a).to_be_bytes());
    let mut png = vec![0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&(w as u32).to_be_bytes());
    ihdr.extend_from_slice(&(h as u32).to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    chunk(&mut png, b"IHDR", &ihdr);
    chunk(&mut png, b"IDAT", &z);
    chunk(&mut png, b"IEND", &[]);
    std::fs::write(path, png).map_err(io_err(path))
}
