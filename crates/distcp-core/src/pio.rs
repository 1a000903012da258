//! Positional file IO: unix's pread/pwrite; elsewhere (wasm32-wasip1, whose std keeps its positional IO unstable)
//! seek + read/write on the shared handle. That is only sound without threads sharing a `File`: wasip1 has none.
#[cfg(unix)]
pub use std::os::unix::fs::FileExt;

#[cfg(not(unix))]
pub trait FileExt {
  fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize>;
  fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<usize>;
  fn read_exact_at(&self, mut buf: &mut [u8], mut offset: u64) -> std::io::Result<()> {
    while !buf.is_empty() {
      match self.read_at(buf, offset) {
        Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
        Ok(n) => {
          buf = &mut buf[n..];
          offset += n as u64;
        }
        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
        Err(e) => return Err(e),
      }
    }
    Ok(())
  }
  fn write_all_at(&self, mut buf: &[u8], mut offset: u64) -> std::io::Result<()> {
    while !buf.is_empty() {
      match self.write_at(buf, offset) {
        Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
        Ok(n) => {
          buf = &buf[n..];
          offset += n as u64;
        }
        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
        Err(e) => return Err(e),
      }
    }
    Ok(())
  }
}

#[cfg(not(unix))]
impl FileExt for std::fs::File {
  fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = self;
    f.seek(SeekFrom::Start(offset))?;
    f.read(buf)
  }
  fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<usize> {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = self;
    f.seek(SeekFrom::Start(offset))?;
    f.write(buf)
  }
}
