//! Deterministic parallel gzip: the tar stream is cut into fixed-size blocks, each deflated
//! on its own with the previous 32 KiB of input as its dictionary and ended by a sync
//! flush, then the pieces are concatenated in order and their crc32s combined (the pigz
//! scheme). The bytes depend only on the input, the level and the block size, never on the
//! thread count or on timing, so `threads = 1` and `threads = 8` give the same blob.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::Scope;

use flate2::{Compress, Crc, FlushCompress, Status};

/// Input bytes per independently deflated block. Part of the layer format: changing it
/// changes every digest.
pub const BLOCK_SIZE: usize = 1024 * 1024;
/// Deflate's window: the dictionary handed from one block to the next.
const WINDOW: usize = 32 * 1024;
/// Fixed gzip header: no name, mtime 0, no extra flags, OS "unknown".
const HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
/// An empty final fixed-Huffman block: ends the deflate stream after the sync-flushed blocks.
const FINAL_BLOCK: [u8; 2] = [0x03, 0x00];

struct Job {
    seq: u64,
    dictionary: Vec<u8>,
    data: Vec<u8>,
    /// An output buffer to fill (recycled: steady state allocates nothing).
    out: Vec<u8>,
}

struct Done {
    seq: u64,
    compressed: io::Result<Vec<u8>>,
    crc: Crc,
    data: Vec<u8>,
    dictionary: Vec<u8>,
}

/// Compresses one block: raw deflate primed with `dictionary`, sync-flushed.
///
/// The output slice handed to deflate has a length fixed by the input size alone, never by
/// a reused buffer's capacity: zlib emits an extra empty stored block when a flush exactly
/// fills the output space and deflate is called again, so output space must not vary
/// between threads.
fn deflate_block(level: u32, dictionary: &[u8], data: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
    // A fresh compressor per block: zlib-rs's reset() leaves state behind that changes the
    // output of the next block, which would tie the bytes to which thread got which block.
    let c = &mut compressor(level);
    if !dictionary.is_empty() {
        c.set_dictionary(dictionary).map_err(io::Error::other)?;
    }
    // Far above deflate's worst case (stored blocks: 5 bytes per 16 KiB) plus the flush.
    let mut room = data.len() + data.len() / 8 + 1024;
    out.clear();
    out.resize(room, 0);
    let (in0, out0) = (c.total_in(), c.total_out());
    loop {
        let consumed = (c.total_in() - in0) as usize;
        let produced = (c.total_out() - out0) as usize;
        let status = c
            .compress(
                &data[consumed..],
                &mut out[produced..room],
                FlushCompress::Sync,
            )
            .map_err(io::Error::other)?;
        let consumed = (c.total_in() - in0) as usize;
        let produced = (c.total_out() - out0) as usize;
        // A sync flush is complete once the compressor leaves output space unused.
        if consumed == data.len() && produced < room {
            out.truncate(produced);
            return Ok(());
        }
        if status == Status::StreamEnd {
            return Err(io::Error::other("deflate ended a stream early"));
        }
        room += 64 * 1024;
        out.resize(room, 0);
    }
}

/// A gzip member written block by block into `out`.
pub struct GzipWriter<W: Write> {
    level: u32,
    out: W,
    block: Vec<u8>,
    dictionary: Vec<u8>,
    crc: Crc,
    next_seq: u64,
    written_seq: u64,
    inline: Option<Vec<u8>>,
    jobs: Option<SyncSender<Job>>,
    results: Option<Receiver<Done>>,
    pending: BTreeMap<u64, Done>,
    /// Emptied input blocks, output buffers and dictionaries, for reuse.
    spare: Vec<Vec<u8>>,
    spare_out: Vec<Vec<u8>>,
    spare_dict: Vec<Vec<u8>>,
    max_in_flight: u64,
}

impl<W: Write> GzipWriter<W> {
    /// Starts a gzip member. With `threads > 1`, that many deflate workers are spawned in
    /// `scope`; they stop when the writer is finished or dropped.
    pub fn new<'scope, 'env>(
        scope: &'scope Scope<'scope, 'env>,
        level: u32,
        threads: usize,
        mut out: W,
    ) -> io::Result<Self> {
        out.write_all(&HEADER)?;
        let mut w = GzipWriter {
            level,
            out,
            block: Vec::with_capacity(BLOCK_SIZE),
            dictionary: Vec::new(),
            crc: Crc::new(),
            next_seq: 0,
            written_seq: 0,
            inline: None,
            jobs: None,
            results: None,
            pending: BTreeMap::new(),
            spare: Vec::new(),
            spare_out: Vec::new(),
            spare_dict: Vec::new(),
            // Deep enough that workers keep busy while the walking thread waits for the CPU,
            // shallow enough to bound memory: each block in flight holds about 2.2 MiB
            // (input, output), so 2 threads keep under 15 MiB.
            max_in_flight: 2 * threads as u64 + 2,
        };
        if threads <= 1 {
            w.inline = Some(Vec::new());
            return Ok(w);
        }
        let (job_tx, job_rx) = mpsc::sync_channel::<Job>(2 * threads + 2);
        let (done_tx, done_rx) = mpsc::channel::<Done>();
        let job_rx = Arc::new(Mutex::new(job_rx));
        for _ in 0..threads {
            let job_rx = Arc::clone(&job_rx);
            let done_tx: Sender<Done> = done_tx.clone();
            scope.spawn(move || worker(level, &job_rx, &done_tx));
        }
        w.jobs = Some(job_tx);
        w.results = Some(done_rx);
        Ok(w)
    }

    /// Feeds tar bytes.
    pub fn write(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let room = BLOCK_SIZE - self.block.len();
            let take = room.min(data.len());
            self.block.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.block.len() == BLOCK_SIZE {
                self.submit()?;
            }
        }
        Ok(())
    }

    /// Ends the member and returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        if !self.block.is_empty() {
            self.submit()?;
        }
        while self.written_seq < self.next_seq {
            self.wait_one()?;
        }
        self.out.write_all(&FINAL_BLOCK)?;
        self.out.write_all(&self.crc.sum().to_le_bytes())?;
        self.out.write_all(&self.crc.amount().to_le_bytes())?;
        self.jobs = None;
        Ok(self.out)
    }

    fn submit(&mut self) -> io::Result<()> {
        let fresh = self
            .spare
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(BLOCK_SIZE));
        let data = std::mem::replace(&mut self.block, fresh);
        let tail = &data[data.len().saturating_sub(WINDOW)..];
        let mut next_dict = self.spare_dict.pop().unwrap_or_default();
        next_dict.clear();
        next_dict.extend_from_slice(tail);
        let dictionary = std::mem::replace(&mut self.dictionary, next_dict);
        let seq = self.next_seq;
        self.next_seq += 1;
        if let Some(buf) = &mut self.inline {
            deflate_block(self.level, &dictionary, &data, buf)?;
            self.crc.update(&data);
            self.out.write_all(buf)?;
            self.written_seq += 1;
            let mut data = data;
            data.clear();
            self.spare.push(data);
            self.spare_dict.push(dictionary);
            return Ok(());
        }
        let jobs = self.jobs.as_ref().expect("parallel writer has a job queue");
        let out = self.spare_out.pop().unwrap_or_default();
        jobs.send(Job {
            seq,
            dictionary,
            data,
            out,
        })
        .map_err(|_| io::Error::other("deflate worker stopped"))?;
        while self.next_seq - self.written_seq >= self.max_in_flight {
            self.wait_one()?;
        }
        self.drain_ready()
    }

    /// Writes the blocks already compressed, without waiting.
    fn drain_ready(&mut self) -> io::Result<()> {
        let results = self.results.as_ref().expect("parallel writer has results");
        while let Ok(done) = results.try_recv() {
            self.pending.insert(done.seq, done);
        }
        self.write_pending()
    }

    /// Waits for at least one block and writes every block now ready, in order.
    fn wait_one(&mut self) -> io::Result<()> {
        let results = self.results.as_ref().expect("parallel writer has results");
        let done = results
            .recv()
            .map_err(|_| io::Error::other("deflate worker stopped"))?;
        self.pending.insert(done.seq, done);
        self.write_pending()
    }

    fn write_pending(&mut self) -> io::Result<()> {
        while let Some(done) = self.pending.remove(&self.written_seq) {
            let compressed = done.compressed?;
            self.out.write_all(&compressed)?;
            self.crc.combine(&done.crc);
            self.written_seq += 1;
            self.spare_out.push(compressed);
            let mut data = done.data;
            data.clear();
            self.spare.push(data);
            self.spare_dict.push(done.dictionary);
        }
        Ok(())
    }
}

fn compressor(level: u32) -> Compress {
    Compress::new(flate2::Compression::new(level), false)
}

fn worker(level: u32, jobs: &Mutex<Receiver<Job>>, done: &Sender<Done>) {
    loop {
        let job = {
            let Ok(rx) = jobs.lock() else { return };
            match rx.recv() {
                Ok(job) => job,
                Err(_) => return,
            }
        };
        let mut crc = Crc::new();
        crc.update(&job.data);
        let mut out = job.out;
        let compressed = deflate_block(level, &job.dictionary, &job.data, &mut out).map(|()| out);
        let result = Done {
            seq: job.seq,
            compressed,
            crc,
            data: job.data,
            dictionary: job.dictionary,
        };
        if done.send(result).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn gzip(data: &[u8], threads: usize) -> Vec<u8> {
        std::thread::scope(|s| {
            let mut w = GzipWriter::new(s, 6, threads, Vec::new()).unwrap();
            for chunk in data.chunks(7777) {
                w.write(chunk).unwrap();
            }
            w.finish().unwrap()
        })
    }

    #[test]
    fn same_bytes_for_any_thread_count_and_round_trips() {
        let mut data = Vec::new();
        let mut x: u32 = 1;
        // More blocks than the writer keeps in flight, so buffers are recycled.
        for i in 0..(12 * BLOCK_SIZE + 12345) {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            data.push(if i % 3 == 0 {
                (x >> 24) as u8
            } else {
                b"corral"[i % 6]
            });
        }
        let one = gzip(&data, 1);
        assert_eq!(one, gzip(&data, 2));
        assert_eq!(one, gzip(&data, 5));
        let mut back = Vec::new();
        flate2::read::GzDecoder::new(&one[..])
            .read_to_end(&mut back)
            .unwrap();
        assert_eq!(back, data);
    }

    #[test]
    fn real_data_gives_same_bytes_for_any_thread_count() {
        // Machine code mixes compressible and incompressible stretches: it once exposed
        // output that depended on which worker (and which reused compressor) got a block.
        let exe = std::fs::read("/proc/self/exe").unwrap();
        let data = &exe[..exe.len().min(6 * BLOCK_SIZE + 777)];
        let one = gzip(data, 1);
        assert_eq!(one, gzip(data, 2));
        assert_eq!(one, gzip(data, 3));
    }

    #[test]
    fn empty_input_is_a_valid_member() {
        let gz = gzip(&[], 2);
        let mut back = Vec::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_end(&mut back)
            .unwrap();
        assert!(back.is_empty());
    }
}
