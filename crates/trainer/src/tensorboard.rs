//! TensorBoard event files (`events.out.tfevents.*`) with every scalar a run
//! logs, written by hand: no protobuf or TensorFlow dependency.
//!
//! The file is a sequence of TFRecords, each
//!
//! ```text
//! u64 length (little-endian) | u32 masked_crc32c(length bytes) | data | u32 masked_crc32c(data)
//! ```
//!
//! with `masked_crc32c(x) = rotr(crc32c(x), 15) + 0xa282ead8` (CRC-32C,
//! Castagnoli). Each `data` is a serialized `tensorflow.Event`; only the
//! fields TensorBoard reads for scalars are written:
//!
//! ```text
//! Event   { 1: double wall_time, 2: int64 step, 3: string file_version, 5: Summary summary }
//! Summary { 1: repeated Value value }
//! Value   { 1: string tag, 2: float simple_value }
//! ```
//!
//! The first record is the `file_version = "brain.Event:2"` event that
//! TensorBoard expects.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{io_err, Result};

/// The CRC-32C (Castagnoli, reflected polynomial 0x82f63b78) table.
const CRC32C_TABLE: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { (c >> 1) ^ 0x82f6_3b78 } else { c >> 1 };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
};

/// CRC-32C of `data` (the check value of `b"123456789"` is 0xe3069283).
pub fn crc32c(data: &[u8]) -> u32 {
    !data.iter().fold(!0u32, |c, &b| {
        CRC32C_TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8)
    })
}

/// TFRecord's masked CRC: `rotr(crc32c(data), 15) + 0xa282ead8`.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    crc32c(data).rotate_right(15).wrapping_add(0xa282_ead8)
}

/// `data` framed as one TFRecord.
pub fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    out
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A length-delimited field (wire type 2).
fn bytes_field(out: &mut Vec<u8>, field: u64, data: &[u8]) {
    varint(out, (field << 3) | 2);
    varint(out, data.len() as u64);
    out.extend_from_slice(data);
}

/// A serialized `Event` with `wall_time`, `step` and either a
/// `file_version` or a `Summary` of scalars (`simple_value`, f32 as
/// TensorBoard stores them).
pub fn event(wall_time: f64, step: i64, file_version: Option<&str>, scalars: &[(&str, f64)]) -> Vec<u8> {
    let mut out = Vec::new();
    out.push(0x09); // 1: double
    out.extend_from_slice(&wall_time.to_le_bytes());
    out.push(0x10); // 2: varint (int64: two's complement, 10 bytes when negative)
    varint(&mut out, step as u64);
    if let Some(v) = file_version {
        bytes_field(&mut out, 3, v.as_bytes());
    }
    if !scalars.is_empty() {
        let mut summary = Vec::new();
        for (tag, v) in scalars {
            let mut value = Vec::new();
            bytes_field(&mut value, 1, tag.as_bytes());
            value.push(0x15); // 2: fixed32
            value.extend_from_slice(&(*v as f32).to_le_bytes());
            bytes_field(&mut summary, 1, &value);
        }
        bytes_field(&mut out, 5, &summary);
    }
    out
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// An open event file in a run folder.
pub struct EventWriter {
    file: std::fs::File,
    path: PathBuf,
}

impl EventWriter {
    /// Creates `dir/events.out.tfevents.<unix seconds>.<host>` (a new file
    /// per start: TensorBoard reads every file of the folder) and writes
    /// the file-version event.
    pub fn create(dir: &Path) -> Result<EventWriter> {
        let t = now();
        let host = std::env::var("HOSTNAME")
            .ok()
            .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
            .map(|h| h.trim().replace(['/', '\\'], "_"))
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "aha".into());
        let mut name = format!("events.out.tfevents.{}.{host}", t as u64);
        let mut k = 1;
        while dir.join(&name).exists() {
            name = format!("events.out.tfevents.{}.{host}.{k}", t as u64);
            k += 1;
        }
        let path = dir.join(name);
        let file = std::fs::File::create(&path).map_err(io_err(&path))?;
        let mut w = EventWriter { file, path };
        w.write(&event(t, 0, Some("brain.Event:2"), &[]))?;
        Ok(w)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes one event holding every finite scalar of `values` at `step`.
    pub fn scalars<'a>(&mut self, step: usize, values: impl IntoIterator<Item = (&'a str, f64)>) -> Result<()> {
        let v: Vec<(&str, f64)> = values.into_iter().filter(|(_, x)| x.is_finite()).collect();
        if v.is_empty() {
            return Ok(());
        }
        self.write(&event(now(), step as i64, None, &v))
    }

    fn write(&mut self, data: &[u8]) -> Result<()> {
        self.file.write_all(&record(data)).map_err(io_err(&self.path))?;
        self.file.flush().map_err(io_err(&self.path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_published_check_values() {
        // The CRC catalogue's check value, and RFC 3720 (iSCSI) B.4.
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62a8_ab43);
        let inc: Vec<u8> = (0..32).collect();
        assert_eq!(crc32c(&inc), 0x46dd_794e);
        assert_eq!(crc32c(b""), 0);
        // The mask: rotate right by 15, add 0xa282ead8.
        assert_eq!(
            masked_crc32c(b"123456789"),
            0xe306_9283u32.rotate_right(15).wrapping_add(0xa282_ead8)
        );
        assert_eq!(masked_crc32c(b""), 0xa282_ead8);
    }

    #[test]
    fn a_record_frames_length_and_data_with_their_masked_crcs() {
        let r = record(b"abc");
        assert_eq!(r.len(), 8 + 4 + 3 + 4);
        assert_eq!(&r[..8], &3u64.to_le_bytes());
        assert_eq!(&r[8..12], &masked_crc32c(&3u64.to_le_bytes()).to_le_bytes());
        assert_eq!(&r[12..15], b"abc");
        assert_eq!(&r[15..], &masked_crc32c(b"abc").to_le_bytes());
    }

    #[test]
    fn events_encode_the_protobuf_fields_tensorboard_reads() {
        let e = event(1.5, 300, Some("brain.Event:2"), &[]);
        let mut want = vec![0x09];
        want.extend_from_slice(&1.5f64.to_le_bytes());
        want.extend_from_slice(&[0x10, 0xac, 0x02, 0x1a, 13]);
        want.extend_from_slice(b"brain.Event:2");
        assert_eq!(e, want);
        let e = event(0.0, 1, None, &[("loss", 0.5)]);
        let mut want = vec![0x09];
        want.extend_from_slice(&0f64.to_le_bytes());
        // step 1; summary (field 5, 13 bytes) { value (field 1, 11 bytes)
        // { tag "loss", simple_value 0.5f } }
        want.extend_from_slice(&[0x10, 0x01, 0x2a, 13, 0x0a, 11, 0x0a, 4]);
        want.extend_from_slice(b"loss");
        want.push(0x15);
        want.extend_from_slice(&0.5f32.to_le_bytes());
        assert_eq!(e, want);
    }

    #[test]
    fn the_writer_writes_framed_events_that_read_back() {
        let dir = std::env::temp_dir().join(format!("aha-tb-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut w = EventWriter::create(&dir).unwrap();
        w.scalars(3, [("reward", 0.25), ("nan", f64::NAN)]).unwrap();
        let bytes = std::fs::read(w.path()).unwrap();
        // Walk the records, checking both CRCs of each.
        let mut at = 0;
        let mut datas = Vec::new();
        while at < bytes.len() {
            let len = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
            let lcrc = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap());
            assert_eq!(lcrc, masked_crc32c(&bytes[at..at + 8]));
            let data = &bytes[at + 12..at + 12 + len];
            let dcrc = u32::from_le_bytes(bytes[at + 12 + len..at + 16 + len].try_into().unwrap());
            assert_eq!(dcrc, masked_crc32c(data));
            datas.push(data.to_vec());
            at += 16 + len;
        }
        assert_eq!(datas.len(), 2);
        assert!(datas[0].ends_with(b"brain.Event:2"));
        let mut tail = b"reward".to_vec();
        tail.push(0x15);
        tail.extend_from_slice(&0.25f32.to_le_bytes());
        assert!(datas[1].ends_with(&tail) && !datas[1].windows(3).any(|x| x == b"nan"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
