// Labels in Japanese and English. The language: ?lang=, then the saved choice, then the browser's.
const DICT = {
  ja: {
    "app.title": "kasou 仮想化基盤",
    "signin.title": "サインイン",
    "signin.user": "ユーザー名",
    "signin.password": "パスワード",
    "signin.submit": "サインイン",
    "signin.failed": "サインインできませんでした",
    "signin.totp": "確認コード（認証アプリ）",
    "signin.totp_needed": "認証アプリに表示されている6桁の確認コードを入力してください",
    "signin.totp_enroll": "このロールでは確認コード（TOTP）が必要です。管理者に登録を依頼してください",
    "signin.directory_down":
      "病院のディレクトリ（Active Directory）に接続できません。ディレクトリのアカウントでは現在サインインできません。ローカルアカウントと緊急用アカウントは使えます。",
    "signout": "サインアウト",
    "account": "アカウント",
    "recordings": "コンソール記録",
    "lang.switch": "English",
  },
  en: {
    "app.title": "kasou virtualization",
    "signin.title": "Sign in",
    "signin.user": "User name",
    "signin.password": "Password",
    "signin.submit": "Sign in",
    "signin.failed": "Could not sign in",
    "signin.totp": "Code (authenticator app)",
    "signin.totp_needed": "enter the 6-digit code your authenticator app shows",
    "signin.totp_enroll": "your role needs a TOTP code here; ask an administrator to enroll you",
    "signin.directory_down":
      "The hospital directory cannot be reached: directory accounts cannot sign in now. Local accounts and break-glass still work.",
    "signout": "Sign out",
    "account": "Account",
    "recordings": "Console recordings",
    "lang.switch": "日本語",
  },
};

export function lang() {
  const q = new URLSearchParams(location.search).get("lang");
  if (q === "ja" || q === "en") {
    localStorage.setItem("kasou.lang", q);
    return q;
  }
  const saved = localStorage.getItem("kasou.lang");
  if (saved === "ja" || saved === "en") return saved;
  return (navigator.language || "ja").startsWith("ja") ? "ja" : "en";
}

// Add labels of a page (each page keeps its own keys beside the shared ones).
export function extend(more) {
  for (const l of Object.keys(more)) Object.assign(DICT[l], more[l]);
}

export function t(key, vars) {
  let s = (DICT[lang()] && DICT[lang()][key]) || DICT.en[key] || key;
  for (const [k, v] of Object.entries(vars || {})) s = s.replaceAll(`{${k}}`, String(v));
  return s;
}

// Fill every element with data-i18n="key" (text) or data-i18n-placeholder="key".
export function translate(root = document) {
  document.documentElement.lang = lang();
  for (const el of root.querySelectorAll("[data-i18n]")) el.textContent = t(el.dataset.i18n);
  for (const el of root.querySelectorAll("[data-i18n-placeholder]")) el.placeholder = t(el.dataset.i18nPlaceholder);
}

export function switchLang() {
  localStorage.setItem("kasou.lang", lang() === "ja" ? "en" : "ja");
  const u = new URL(location.href);
  u.searchParams.delete("lang");
  location.href = u.toString();
}
