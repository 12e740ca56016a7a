"""An HTTPS front for moto's STS, for testing web identity credentials on loopback.

AWS SDKs and object_store call STS only over HTTPS and send AssumeRoleWithWebIdentity (an unsigned call) with its
parameters in the query string; moto serves plain HTTP and, for unsigned calls, finds the action in the form body.
This front terminates TLS with a self-signed certificate (made with openssl) and forwards each request to moto with
the query string moved into the body. moto in IAM-auth mode asks every call for a signature, this unsigned one too,
so with KEY_ID and SECRET (an IAM user's key in that moto) the front signs what it forwards (botocore, from moto's
virtualenv). Usage:
    $MOTO_VENV/bin/python sts-front.py PORT MOTO_URL DIR [KEY_ID SECRET]
writes DIR/cert.pem and DIR/key.pem, serves https://127.0.0.1:PORT and prints "ready".
"""

import http.server
import ssl
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request


def main():
    port, moto, state = int(sys.argv[1]), sys.argv[2].rstrip("/"), sys.argv[3]
    signer = sys.argv[4:6] if len(sys.argv) >= 6 else None
    cert, key = f"{state}/cert.pem", f"{state}/key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", key, "-out", cert],
        check=True, capture_output=True)

    class Front(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            url = urllib.parse.urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length).decode() if length else ""
            # Encoded again as botocore encodes forms: moto checks the signature against its own encoding.
            form = urllib.parse.urlencode(urllib.parse.parse_qsl(url.query) + urllib.parse.parse_qsl(body))
            headers = {"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"}
            if signer:
                from botocore.auth import SigV4Auth
                from botocore.awsrequest import AWSRequest
                from botocore.credentials import Credentials

                signed = AWSRequest(method="POST", url=f"{moto}/", data=form, headers=headers)
                SigV4Auth(Credentials(*signer), "sts", "us-east-1").add_auth(signed)
                headers = dict(signed.headers.items())
            request = urllib.request.Request(f"{moto}/", data=form.encode(), method="POST", headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=30) as r:
                    status, answer = r.status, r.read()
            except urllib.error.HTTPError as e:
                status, answer = e.code, e.read()
            self.send_response(status)
            self.send_header("Content-Type", "text/xml")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Front)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
