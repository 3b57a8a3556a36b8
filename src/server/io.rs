//! tokio's I/O traits (what h2 drives) over a futures-io stream (a glommio
//! socket, or rustls over one), in place of tokio-util's `Compat`, for two
//! costs that adapter has on every read and write:
//!
//! - Reads: `Compat` zeroes all of the spare capacity of h2's read buffer
//!   before each read (the inner stream takes an initialized `&mut [u8]`).
//!   That buffer grows to the largest frame seen, so after one 1 MiB put a
//!   connection zeroed up to 1 MiB per read. Here a plain TCP connection
//!   reads into the buffer's spare capacity as it is, uninitialized (the
//!   kernel writes it: `glommio::net::TcpStream::poll_read_uninit`, a
//!   keelson patch), and any other stream (rustls) is asked for what recent
//!   reads needed, zeroed first: it starts at `READ_BYTES_MIN` and doubles,
//!   up to `READ_BYTES_MAX`, while reads fill what they asked for, and
//!   halves back when they use less than a quarter.
//! - Writes: `Compat` is not vectored, so h2 writes a DATA frame's payload
//!   that it keeps apart from its frame buffer (over 256 bytes: a range
//!   answer with one value) in a second write call. Here vectored writes of
//!   up to `GATHER_BYTES_MAX` are gathered into one buffer and written with
//!   one call.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};

/// The least and the most one read asks for (and zeroes first).
const READ_BYTES_MIN: usize = 4 << 10;
const READ_BYTES_MAX: usize = 1 << 20;
/// Vectored writes up to this many bytes go out as one write.
const GATHER_BYTES_MAX: usize = 256 << 10;

pub struct TokioIo<S> {
    inner: S,
    /// Where vectored writes are gathered; kept for reuse.
    gather: Vec<u8>,
    /// What the next read asks for at most.
    read_ask: usize,
}

impl<S> TokioIo<S> {
    pub fn new(inner: S) -> TokioIo<S> {
        TokioIo {
            inner,
            gather: Vec::new(),
            read_ask: READ_BYTES_MIN,
        }
    }
}

/// A stream that reads into a `ReadBuf`; `read_ask` is the reader's state
/// for streams that must be given initialized memory. By default a read
/// goes into zeroed memory (`poll_read_zeroed`).
pub trait ReadInto: futures::io::AsyncRead {
    fn poll_read_into(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
        read_ask: &mut usize,
    ) -> Poll<io::Result<()>> {
        poll_read_zeroed(self, cx, buf, read_ask)
    }
}

impl ReadInto for glommio::net::TcpStream {
    fn poll_read_into(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
        _: &mut usize,
    ) -> Poll<io::Result<()>> {
        // SAFETY: the spare capacity is only written (by the kernel), and
        // only the `n` bytes it wrote are then marked filled.
        let spare = unsafe { buf.unfilled_mut() };
        let n = std::task::ready!(self.poll_read_uninit(cx, spare))?;
        unsafe { buf.assume_init(n) };
        buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<S: futures::io::AsyncRead + futures::io::AsyncWrite + Unpin> ReadInto
    for futures_rustls::server::TlsStream<S>
{
}

/// Reads into zeroed memory, as much as recent reads needed (`read_ask`).
fn poll_read_zeroed<S: futures::io::AsyncRead + ?Sized>(
    inner: Pin<&mut S>,
    cx: &mut Context<'_>,
    buf: &mut tokio::io::ReadBuf<'_>,
    read_ask: &mut usize,
) -> Poll<io::Result<()>> {
    let want = buf.remaining().min(*read_ask);
    let slice = &mut buf.initialize_unfilled_to(want)[..want];
    let n = std::task::ready!(inner.poll_read(cx, slice))?;
    if n == *read_ask {
        *read_ask = (*read_ask * 2).min(READ_BYTES_MAX);
    } else if n < *read_ask / 4 {
        *read_ask = (*read_ask / 2).max(READ_BYTES_MIN);
    }
    buf.advance(n);
    Poll::Ready(Ok(()))
}

impl<S: ReadInto + Unpin> tokio::io::AsyncRead for TokioIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        Pin::new(&mut this.inner).poll_read_into(cx, buf, &mut this.read_ask)
    }
}

impl<S: futures::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for TokioIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let mut nonempty = bufs.iter().filter(|b| !b.is_empty());
        let (Some(first), Some(_)) = (nonempty.next(), nonempty.next()) else {
            // Zero or one slice with bytes: nothing to gather.
            let one = bufs
                .iter()
                .find(|b| !b.is_empty())
                .map(|b| &b[..])
                .unwrap_or(&[]);
            return Pin::new(&mut this.inner).poll_write(cx, one);
        };
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if total > GATHER_BYTES_MAX {
            return Pin::new(&mut this.inner).poll_write(cx, first);
        }
        // A partial or refused write is reported as such; the caller comes
        // back with the same slices (less what was written), gathered again.
        this.gather.clear();
        for b in bufs {
            this.gather.extend_from_slice(b);
        }
        let r = Pin::new(&mut this.inner).poll_write(cx, &this.gather);
        if this.gather.capacity() > GATHER_BYTES_MAX {
            this.gather = Vec::new();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_close(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A futures-io stream that records every write call and reads back
    /// at most `chunk` bytes a call of what it was given.
    struct Recorder {
        writes: Vec<Vec<u8>>,
        input: Vec<u8>,
        chunk: usize,
    }

    impl futures::io::AsyncRead for Recorder {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut [u8],
        ) -> Poll<io::Result<usize>> {
            let n = buf.len().min(self.chunk).min(self.input.len());
            buf[..n].copy_from_slice(&self.input[..n]);
            self.input.drain(..n);
            Poll::Ready(Ok(n))
        }
    }

    impl ReadInto for Recorder {}

    impl futures::io::AsyncWrite for Recorder {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            // Takes at most 7 bytes a call, to exercise partial writes.
            let n = buf.len().min(7);
            self.writes.push(buf[..n].to_vec());
            Poll::Ready(Ok(n))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[test]
    fn vectored_writes_are_gathered_and_partial_writes_resume() {
        futures::executor::block_on(async {
            let mut io = TokioIo::new(Recorder {
                writes: Vec::new(),
                input: Vec::new(),
                chunk: usize::MAX,
            });
            let a = b"head:";
            let b = b"payload-bytes";
            let mut slices = [IoSlice::new(a), IoSlice::new(&[]), IoSlice::new(b)];
            let mut sent = Vec::new();
            let mut left: &mut [IoSlice<'_>] = &mut slices;
            while !left.is_empty() {
                let n = io.write_vectored(left).await.unwrap();
                IoSlice::advance_slices(&mut left, n);
                sent.push(n);
            }
            let out: Vec<u8> = io.inner.writes.concat();
            assert_eq!(out, b"head:payload-bytes");
            // The first call carried bytes of both slices.
            assert_eq!(io.inner.writes[0], b"head:pa");
        });
    }

    #[test]
    fn reads_ask_for_what_recent_reads_needed_and_all_bytes_arrive() {
        futures::executor::block_on(async {
            let input: Vec<u8> = (0..(READ_BYTES_MAX * 3 + 10)).map(|i| i as u8).collect();
            let mut io = TokioIo::new(Recorder {
                writes: Vec::new(),
                input: input.clone(),
                chunk: usize::MAX,
            });
            let mut buf = vec![0u8; READ_BYTES_MAX * 4];
            // A stream with plenty to read: asks double up to the cap.
            let mut sizes = Vec::new();
            let mut all = Vec::new();
            while all.len() < input.len() {
                let n = io.read(&mut buf).await.unwrap();
                sizes.push(n);
                all.extend_from_slice(&buf[..n]);
            }
            assert_eq!(all, input);
            assert_eq!(sizes[0], READ_BYTES_MIN);
            assert_eq!(sizes[1], READ_BYTES_MIN * 2);
            assert!(sizes.iter().all(|&n| n <= READ_BYTES_MAX));
            assert!(sizes.contains(&READ_BYTES_MAX));
            // Small reads bring the ask back down.
            io.inner.chunk = 10;
            io.inner.input = vec![1; 1000];
            for _ in 0..20 {
                io.read(&mut buf).await.unwrap();
            }
            assert_eq!(io.read_ask, READ_BYTES_MIN);
        });
    }

    /// A plain TCP connection reads into h2-like spare capacity left
    /// uninitialized (`read_buf` on a `Vec` with room): every byte sent
    /// arrives, in order, whatever the sizes of the reads.
    #[test]
    fn tcp_reads_into_uninitialized_capacity_deliver_every_byte() {
        let total = 3 * READ_BYTES_MAX + 12_345;
        let input: Vec<u8> = (0..total).map(|i| (i * 7 + i / 251) as u8).collect();
        let want = input.clone();
        glommio::LocalExecutorBuilder::default()
            .spawn(move || async move {
                let listener = glommio::net::TcpListener::bind("127.0.0.1:0").unwrap();
                let addr = listener.local_addr().unwrap();
                let writer = glommio::spawn_local(async move {
                    use futures::io::AsyncWriteExt as _;
                    let mut c = glommio::net::TcpStream::connect(addr).await.unwrap();
                    // Uneven pieces, so that reads end mid-way.
                    for piece in input.chunks(100_003) {
                        c.write_all(piece).await.unwrap();
                    }
                    c.close().await.unwrap();
                });
                let stream = listener.accept().await.unwrap();
                let mut io = TokioIo::new(stream);
                let mut got: Vec<u8> = Vec::new();
                let mut reads = 0;
                loop {
                    // Spare capacity the read sees uninitialized.
                    got.reserve(64 << 10);
                    let n = io.read_buf(&mut got).await.unwrap();
                    if n == 0 {
                        break;
                    }
                    reads += 1;
                }
                writer.await;
                assert!(reads > 1);
                assert_eq!(got.len(), want.len());
                assert!(got == want, "bytes differ");
            })
            .unwrap()
            .join()
            .unwrap();
    }
}
