//! A filter for root-filesystem tars: [`SkipRootEntry`].

use std::collections::VecDeque;
use std::io::{self, Read};

/// Drops the entries of a tar stream that name the archive's root itself (`./`, as
/// `tar -C DIR -c .` writes first) together with their extension headers, and passes
/// everything else through unchanged. [`udos_layer::unpack`] refuses such an entry
/// (it would name the target directory); a root tar may have one.
pub(super) struct SkipRootEntry<R> {
    inner: R,
    out: VecDeque<u8>,
    /// Extension headers (pax, GNU long names) waiting for the entry they describe.
    pending: Vec<u8>,
    pending_name: Option<Vec<u8>>,
    /// Bytes of the current member's data (with padding) still to pass through.
    data_left: u64,
    /// After the end-of-archive block everything passes through.
    done: bool,
}

/// Extension headers larger than this are passed on unfiltered (unpack bounds them).
const MAX_PENDING: usize = 1 << 20;

fn padded(size: u64) -> u64 {
    size.div_ceil(512) * 512
}

fn names_root(name: &[u8]) -> bool {
    name.split(|b| *b == b'/')
        .all(|c| c.is_empty() || c == b".")
}

impl<R: Read> SkipRootEntry<R> {
    pub(super) fn new(inner: R) -> Self {
        SkipRootEntry {
            inner,
            out: VecDeque::new(),
            pending: Vec::new(),
            pending_name: None,
            data_left: 0,
            done: false,
        }
    }

    /// Reads one header block; `None` at the end of the stream.
    fn block(&mut self) -> io::Result<Option<[u8; 512]>> {
        let mut b = [0u8; 512];
        let mut got = 0;
        while got < 512 {
            match self.inner.read(&mut b[got..]) {
                Ok(0) if got == 0 => return Ok(None),
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(Some(b))
    }

    fn flush_pending(&mut self) {
        self.out.extend(self.pending.drain(..));
        self.pending_name = None;
    }

    /// Handles the next header: queues what passes into `out`.
    fn next_header(&mut self) -> io::Result<()> {
        let Some(block) = self.block()? else {
            self.flush_pending();
            self.done = true;
            return Ok(());
        };
        if block.iter().all(|b| *b == 0) {
            self.flush_pending();
            self.out.extend(block);
            self.done = true;
            return Ok(());
        }
        let h = tar::Header::from_byte_slice(&block);
        let size = h.entry_size()?;
        let kind = h.entry_type();
        let extension = matches!(
            kind,
            tar::EntryType::XHeader | tar::EntryType::GNULongName | tar::EntryType::GNULongLink
        );
        if extension && self.pending.len() as u64 + 512 + padded(size) <= MAX_PENDING as u64 {
            let mut data = vec![0u8; usize::try_from(padded(size)).unwrap_or(usize::MAX)];
            self.inner.read_exact(&mut data)?;
            let body = &data[..usize::try_from(size).unwrap_or(data.len()).min(data.len())];
            match kind {
                tar::EntryType::GNULongName => {
                    let mut n = body.to_vec();
                    while n.last() == Some(&0) {
                        n.pop();
                    }
                    self.pending_name = Some(n);
                }
                tar::EntryType::XHeader => {
                    for ext in tar::PaxExtensions::new(body).flatten() {
                        if ext.key_bytes() == b"path" {
                            self.pending_name = Some(ext.value_bytes().to_vec());
                        }
                    }
                }
                _ => {}
            }
            self.pending.extend_from_slice(&block);
            self.pending.extend_from_slice(&data);
            return Ok(());
        }
        let name = self
            .pending_name
            .clone()
            .unwrap_or_else(|| h.path_bytes().into_owned());
        if kind == tar::EntryType::Directory && size == 0 && names_root(&name) {
            self.pending.clear();
            self.pending_name = None;
            return Ok(());
        }
        self.flush_pending();
        self.out.extend(block);
        self.data_left = padded(size);
        Ok(())
    }
}

impl<R: Read> Read for SkipRootEntry<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if !self.out.is_empty() {
                let n = self.out.len().min(buf.len());
                for (dst, src) in buf.iter_mut().zip(self.out.drain(..n)) {
                    *dst = src;
                }
                return Ok(n);
            }
            if self.done {
                return self.inner.read(buf);
            }
            if self.data_left > 0 {
                let want = usize::try_from(self.data_left)
                    .unwrap_or(usize::MAX)
                    .min(buf.len());
                let n = self.inner.read(&mut buf[..want])?;
                if n == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                self.data_left -= n as u64;
                return Ok(n);
            }
            self.next_header()?;
        }
    }
}
